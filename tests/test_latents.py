"""Latent modules: closed-form KL, straight-through mask, summaries, the four latent kinds."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from worldmodel.model.latents import (
    SIGMA_INIT,
    OracleLatent,
    SparseLatent,
    VariationalLatent,
    gaussian_kl,
    straight_through_bernoulli,
)
from worldmodel.model.summaries import Summaries


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, mu_p = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sigma_q, sigma_p = torch.rand(3, 5, 4) + 0.1, torch.rand(3, 5, 4) + 0.1
    expected = kl_divergence(Normal(mu_q, sigma_q), Normal(mu_p, sigma_p)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu_q, sigma_q, mu_p, sigma_p), expected)
    assert gaussian_kl(mu_q, sigma_q, mu_q, sigma_q).abs().max() < 1e-6


def test_straight_through_mask_is_hard_forward_with_logit_gradients():
    torch.manual_seed(0)
    logits = torch.randn(64, 8, requires_grad=True)
    mask = straight_through_bernoulli(logits)
    assert set(mask.detach().unique().tolist()) == {0.0, 1.0}
    (mask * torch.randn(64, 8)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    noise_free = straight_through_bernoulli(torch.tensor([-2.0, -0.1, 0.1, 3.0]), sample=False)
    assert noise_free.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_sampled_mask_rate_follows_sigmoid_of_logits():
    torch.manual_seed(0)
    logits = torch.full((20000,), 1.0)
    rate = straight_through_bernoulli(logits).mean()
    assert abs(rate - torch.sigmoid(torch.tensor(1.0))) < 0.02


def test_trunk_context_summary_reads_one_position_of_the_trunk_output():
    torch.manual_seed(0)
    summaries = Summaries(embed_dim=4, summary_dim=6, context_dim=8)
    features = torch.randn(2, 3, 5, 8)  # predictor trunk output [B, T, N, P]: position t has seen frames <= t
    s = summaries.context(features)
    assert s.shape == (2, 3, 6)
    normed = summaries.context_norm(features)
    torch.testing.assert_close(s[:, 1], summaries.context_proj(summaries.context_pool(normed)[:, 1]))
    changed = features.clone()
    changed[:, 0] += 1.0
    torch.testing.assert_close(summaries.context(changed)[:, 1:], s[:, 1:])
    x_plus, x_t, x_prev = torch.randn(3, 2, 3, 5, 4).unbind(0)
    assert summaries.target(x_plus, x_t, x_prev).shape == (2, 3, 6)


def test_target_summary_reads_the_change_of_motion():
    """Per token, s+ reads [x+, x+ - x_t, x+ - 2 x_t + x_{t-1}] (the next frame, its step and the step's change),
    from detached inputs. With a uniform pool (zero scores: each head is the mean over tokens) and an identity
    projection, s+ shows those three for hand-picked frames: a uniform motion has no change of step, a kick has."""
    summaries = Summaries(embed_dim=2, summary_dim=6, heads=1)
    with torch.no_grad():
        summaries.target_pool.score.weight.zero_()
        summaries.target_pool.score.bias.zero_()
        summaries.target_proj.weight.copy_(torch.eye(6))
        summaries.target_proj.bias.zero_()

    def frame(x: float, y: float) -> torch.Tensor:  # one frame of 3 tokens [1, 1, 3, 2], all at (x, y)
        return torch.tensor([x, y]).expand(1, 1, 3, 2).clone()

    uniform = summaries.target(frame(3.0, 1.0), frame(2.0, 1.0), frame(1.0, 1.0))  # x moves by 1, then by 1
    torch.testing.assert_close(uniform[0, 0], torch.tensor([3.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    kicked = summaries.target(frame(2.0, 3.0), frame(2.0, 1.0), frame(1.0, 1.0))  # by (1, 0), then by (0, 2)
    torch.testing.assert_close(kicked[0, 0], torch.tensor([2.0, 3.0, 0.0, 2.0, -1.0, 2.0]))
    inputs = [frame(2.0, 3.0).requires_grad_(), frame(2.0, 1.0).requires_grad_(), frame(1.0, 1.0).requires_grad_()]
    summaries.target(*inputs).sum().backward()
    assert all(x.grad is None for x in inputs)  # the posterior's view of the frames passes no gradient back


def test_context_summary_ignores_the_scale_of_the_trunk_output():
    # The trunk's output is its residual stream; read raw, it took the summary's norm up 30x in the first 150 steps on
    # the push world, which carried AdaSSL-V's sigma from 0.1 to 10 and r was ignored until it came back down.
    torch.manual_seed(0)
    summaries = Summaries(embed_dim=4, summary_dim=6, context_dim=8)
    features = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(summaries.context(30.0 * features), summaries.context(features), atol=1e-4, rtol=1e-4)


def test_variational_latent_reparameterised_sample_and_kl():
    torch.manual_seed(0)
    latent = VariationalLatent(summary_dim=6, latent_dim=3)
    for net in (latent.posterior_net, latent.prior_net):  # as after training (they start zero-initialised)
        torch.nn.init.normal_(net[-1].weight, std=0.5)
    s, s_plus = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6)
    out = latent(s, s_plus)
    assert out["r"].shape == (2, 4, 3) and out["kl"].shape == (2, 4)
    assert (out["sigma_q"] > 0).all() and (out["sigma_p"] > 0).all()
    torch.testing.assert_close(out["innovation"], (out["mu_q"] - out["mu_p"]) / out["sigma_p"])
    torch.testing.assert_close(out["kl"], gaussian_kl(out["mu_q"], out["sigma_q"], out["mu_p"], out["sigma_p"]))
    out["r"].sum().backward()
    assert s.grad.abs().sum() > 0
    s2, s2_plus = s.detach()[:, 0], s_plus[:, 0]
    torch.testing.assert_close(latent.rollout_r("prior_mean", s2, None, None), latent.prior(s2)[0])
    torch.testing.assert_close(latent.rollout_r("posterior", s2, s2_plus, None), latent.posterior(s2, s2_plus)[0])
    assert not torch.allclose(latent.rollout_r("prior_sample", s2, None, None), latent.prior(s2)[0])


def test_sparse_latent_masks_values_and_counts_active_dims():
    torch.manual_seed(0)
    latent = SparseLatent(summary_dim=6, latent_dim=3).train()
    s, s_plus = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    out = latent(s, s_plus)
    torch.testing.assert_close(out["r"], out["mask"] * out["values"])
    torch.testing.assert_close(out["reg"], out["mask_prob"].sum(-1))
    assert not torch.equal(latent.rate, torch.full((3,), 0.5))  # marginal statistics moved in training
    latent.eval()
    logits, values = latent.mask_and_values(s, s_plus)
    torch.testing.assert_close(latent(s, s_plus)["r"], (logits > 0).float() * values)


def test_sparse_latent_prior_modes():
    latent = SparseLatent(summary_dim=6, latent_dim=3)
    s = torch.randn(5, 6)
    assert latent.rollout_r("prior_mean", s, None, None).eq(0).all()
    latent.rate.fill_(0.0)
    assert latent.rollout_r("prior_sample", s, None, None).eq(0).all()
    latent.rate.fill_(1.0)
    latent.value_mean.fill_(2.0)
    latent.value_var.fill_(0.0)
    assert latent.rollout_r("prior_sample", s, None, None).eq(2.0).all()


def test_oracle_latent_embeds_actions_and_explains_missing_ones():
    latent = OracleLatent(action_dim=2, latent_dim=3)
    assert latent(torch.randn(4, 5, 2)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="has none"):
        latent(None)
    with pytest.raises(ValueError, match="action_dim=2"):
        latent(torch.randn(4, 5, 3))
    with pytest.raises(ValueError, match="action_dim >= 1"):
        OracleLatent(action_dim=0, latent_dim=3)


def test_adassl_v_kl_is_exactly_zero_at_initialisation():
    """Prior and posterior heads start identical (zero output weights, same sigma bias): KL 0 for any input."""
    torch.manual_seed(0)
    latent = VariationalLatent(summary_dim=16, latent_dim=4)
    out = latent(torch.randn(8, 3, 16), torch.randn(8, 3, 16))
    assert torch.equal(out["kl"], torch.zeros(8, 3))
    torch.testing.assert_close(out["sigma_q"], torch.full((8, 3, 4), SIGMA_INIT))
    assert torch.equal(out["mu_q"], out["mu_p"])


def test_every_configurable_latent_has_its_class():
    """The config's choices (the Literal type in model/config.py) and the registry of behaviour name the same kinds."""
    from worldmodel.model.config import LATENTS
    from worldmodel.model.latents import LATENT_CLASSES

    assert tuple(LATENT_CLASSES) == LATENTS
    assert all(cls.name == name for name, cls in LATENT_CLASSES.items())


def test_prior_anchor_adds_the_prior_s_kl_to_a_narrow_standard_gaussian():
    torch.manual_seed(0)
    plain = VariationalLatent(16, 4)
    s, s_plus = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    anchored = VariationalLatent(16, 4, prior_anchor=0.5)
    anchored.load_state_dict(plain.state_dict())
    torch.testing.assert_close(anchored(s, s_plus)["reg"], plain(s, s_plus)["reg"])  # p = N(0, SIGMA_INIT^2) at init
    torch.nn.init.normal_(plain.prior_net[-1].weight, std=0.5)
    torch.nn.init.normal_(plain.posterior_net[-1].weight, std=0.5)
    anchored.load_state_dict(plain.state_dict())
    out_plain, out = plain(s, s_plus), anchored(s, s_plus)
    torch.testing.assert_close(out["kl"], out_plain["kl"])  # the detector reads KL(q || p) alone
    anchor = kl_divergence(Normal(out["mu_p"], out["sigma_p"]), Normal(0.0, SIGMA_INIT)).sum(-1)
    assert (anchor > 0.1).all()
    torch.testing.assert_close(out["reg"], out_plain["reg"] + 0.5 * anchor)
