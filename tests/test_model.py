"""WorldModel: the training forward, EMA target, latent inference, the one rollout function,
and a short training run on real moving-digit clips for every latent kind."""

import numpy as np
import pytest
import torch
from torch import nn

from worldmodel.model.config import ModelConfig
from worldmodel.model.world_model import WorldModel
from worlds.moving_digits import simulate

LATENT_KINDS = ["none", "adassl_v", "adassl_s", "oracle"]


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        pred_dim=32,
        pred_depth=2,
        pred_cond_depth=1,
        pred_num_heads=2,
        latent_dim=4,
        summary_dim=16,
        action_dim=2,
        frame_dim=32,
    )
    values.update(overrides)
    return ModelConfig(**values)


def make_model(seed: int = 0, **overrides) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(tiny_cfg(**overrides))


@pytest.fixture(scope="module")
def digits():
    """8 real moving-digit clips of 4 frames, subsampled to 32x32: frames uint8 [8, 4, 32, 32, 3], action [8, 3, 2]."""
    rng = np.random.default_rng(0)
    videos = [simulate(4, rng, kick_prob=0.3) for _ in range(8)]
    frames = torch.from_numpy(np.stack([v[::, ::2, ::2] for v, _ in videos]))
    action = torch.tensor(np.stack([meta["action"] for _, meta in videos]), dtype=torch.float32)
    return frames, action


def perturb_conditioning(model: WorldModel) -> None:
    """Random weights for the zero-initialised conditioning, output layer and AdaSSL-V heads, so r visibly changes
    predictions (as after training)."""
    for name, param in model.predictor.named_parameters():
        if "modulation" in name or "out_proj" in name:
            nn.init.normal_(param, std=0.5)
    if model.cfg.latent == "adassl_v":
        for net in (model.latent.posterior_net, model.latent.prior_net):
            nn.init.normal_(net[-1].weight, std=0.5)


# ---- forward, EMA --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent", LATENT_KINDS)
@pytest.mark.parametrize("granularity", ["frame", "tokens"])
def test_forward_terms_and_gradients(latent, granularity, digits):
    frames, action = digits
    model = make_model(latent=latent, rollout_steps=2, granularity=granularity)
    out = model(frames, action=action, beta=0.5)
    expected = {"pred", "reg", "rollout"} | ({"kl"} if latent == "adassl_v" else set())
    assert set(out["terms"]) == expected
    assert {"copy_last", "emb_std", "emb_eff_rank", "target_var", "target_eff_rank", "drift"} <= set(out["monitors"])
    for value in [out["loss"], *out["terms"].values(), *out["monitors"].values()]:
        assert value.ndim == 0 and torch.isfinite(value)
    terms = out["terms"]
    torch.testing.assert_close(out["loss"], terms["pred"] + 0.5 * terms["reg"] + terms["rollout"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # every trainable parameter is used (DDP without find_unused_parameters)
    assert all(p.grad is None for p in model.target_encoder.parameters())


@pytest.mark.parametrize("latent", LATENT_KINDS)
@pytest.mark.parametrize("granularity", ["frame", "tokens"])
def test_prior_mean_term_trains_the_prior_through_the_prediction(latent, granularity, digits):
    frames, action = digits
    model = make_model(latent=latent, prior_mean_weight=0.5, granularity=granularity)
    perturb_conditioning(model)
    out = model(frames, action=action, beta=0.0)
    terms = out["terms"]
    if latent in ("none", "oracle"):  # no prior: the weight is ignored, as beta is
        assert "pred_prior" not in terms
        return
    torch.testing.assert_close(out["loss"], terms["pred"] + 0.5 * terms["pred_prior"])
    assert not torch.allclose(terms["pred_prior"], terms["pred"])
    out["loss"].backward()
    if latent == "adassl_v":  # at beta 0 only the prior-mean prediction reaches the prior's mean
        assert model.latent.prior_net[-1].weight.grad[: model.cfg.latent_dim].abs().sum() > 0
        model.zero_grad()
        off = make_model(latent=latent, granularity=granularity)
        perturb_conditioning(off)
        off(frames, beta=0.0)["loss"].backward()
        assert off.latent.prior_net[-1].weight.grad[: off.cfg.latent_dim].abs().sum() == 0
    model.eval()
    tokens = model.encode(frames)
    features = model.predictor.trunk_features(tokens[:, :-1])
    r_train = model.latent.prior_mean_r(features, model.summaries)  # [B, T-1, d_r]
    r_rollout = model.latent.step_r("prior_mean", features, tokens[:, :-1], None, None, model.summaries, None)
    torch.testing.assert_close(r_train[:, -1], r_rollout)  # what training reads is what rollouts draw


@pytest.mark.parametrize("latent", ["adassl_v", "adassl_s"])
@pytest.mark.parametrize("pred_dim", [32, 16])  # 16: a predictor narrower than the encoder, whose trunk s_t reads
def test_trunk_context_summary_trains_every_parameter_and_reads_the_past_only(latent, pred_dim, digits):
    frames, action = digits
    model = make_model(latent=latent, pred_dim=pred_dim)
    out = model(frames, action=action, beta=0.5)
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    tokens, target = model.encode(frames), model.encode_target(frames)
    s, s_plus = model.summaries_of(tokens, target)
    assert s.shape == s_plus.shape == (8, 3, 16)
    changed = tokens.clone()
    changed[:, 2:] = torch.randn_like(changed[:, 2:])  # frames 2, 3: unseen by s_0, s_1 (transitions 0->1, 1->2)
    s_changed, _ = model.summaries_of(changed, target)
    torch.testing.assert_close(s_changed[:, :2], s[:, :2])
    assert not torch.allclose(s_changed[:, 2], s[:, 2])
    moved = tokens.clone()
    moved[:, 1] += 1.0  # frame 1: the predictor's input of transitions 1->2 (as x_t) and 2->3 (as x_{t-1})
    _, s_plus_moved = model.summaries_of(moved, target)
    torch.testing.assert_close(s_plus_moved[:, 0], s_plus[:, 0])
    assert not torch.allclose(s_plus_moved[:, 1], s_plus[:, 1])
    assert not torch.allclose(s_plus_moved[:, 2], s_plus[:, 2])


def test_oracle_without_action_is_a_clear_error(digits):
    frames, _ = digits
    with pytest.raises(ValueError, match="latent=oracle needs action"):
        make_model(latent="oracle")(frames)


def test_ema_target_gets_no_grads_and_moves_toward_online(digits):
    frames, _ = digits
    model = make_model(latent="adassl_v")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # the first step moves only the zero-initialised output layer; the second reaches the encoder
        optimizer.zero_grad()
        model(frames, beta=0.01)["loss"].backward()
        optimizer.step()
    assert all(not p.requires_grad and p.grad is None for p in model.target_encoder.parameters())

    def gap() -> float:
        pairs = zip(model.target_encoder.parameters(), model.encoder.parameters(), strict=True)
        return sum((t - o).norm().item() for t, o in pairs)

    before = gap()
    assert before > 0
    model.update_target(0.9)
    assert gap() == pytest.approx(0.9 * before, rel=1e-4)


def test_norm_statistics_update_only_in_training_and_separately_per_space(digits):
    frames, _ = digits
    model = make_model()
    model.eval()
    model(frames)
    assert model.norm.center.eq(0).all() and model.online_norm.center.eq(0).all()
    model.train()
    with torch.no_grad():  # the online encoder apart from its EMA copy, so the two spaces' raw means differ
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model(frames)
    assert model.norm.center.abs().sum() > 0 and model.online_norm.center.abs().sum() > 0
    assert not torch.allclose(model.norm.center, model.online_norm.center)


# ---- latent inference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("latent", "detector"), [("adassl_v", "kl"), ("adassl_s", "expected_active")])
def test_infer_latents_is_what_training_regularises_per_transition(latent, detector, digits):
    """The evaluation's event detector (infer_latents) reads, for transition t -> t+1, what the training forward
    regularised for that transition: its mean over the clip is the forward's regulariser, and target frame j moves
    transition j-1's entry and no other."""
    frames, action = digits
    model = make_model(latent=latent)
    perturb_conditioning(model)
    model.eval()
    tokens, target = model.encode(frames), model.encode_target(frames)
    out = model.infer_latents(tokens, target)
    assert out[detector].shape == (8, 3)
    torch.testing.assert_close(out[detector].mean(), model(frames, action=action)["terms"]["reg"])
    assert out[detector].std() > 0  # the transitions differ: the test below can see which one moved
    for j in (1, 2, 3):
        changed = target.clone()
        changed[:, j] = torch.randn_like(changed[:, j])
        moved = model.infer_latents(tokens, changed)[detector]
        changed_transitions = [t for t in range(3) if not torch.allclose(moved[:, t], out[detector][:, t])]
        assert changed_transitions == [j - 1]
    for other in ("none", "oracle"):
        with pytest.raises(ValueError, match="needs an inferred latent"):
            make_model(latent=other).infer_latents(tokens, target)


def test_adassl_v_with_r_zero_predicts_what_none_predicts(digits):
    frames, _ = digits
    plain = make_model(latent="none").eval()
    nn.init.normal_(plain.predictor.out_proj.weight, std=0.5)  # as after training
    adassl = make_model(latent="adassl_v", seed=1).eval()
    result = adassl.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith(("summaries.", "latent.")) or "modulation" in k for k in result.missing_keys)
    tokens = plain.encode(frames)
    r = torch.zeros(8, 4, 4)
    torch.testing.assert_close(adassl.predictor(tokens, r), plain.predictor(tokens))
    assert not torch.allclose(adassl.predictor(tokens, torch.randn(8, 4, 4)), plain.predictor(tokens))


def test_every_method_starts_from_the_unconditioned_predictor_at_a_seed():
    """The conditioning's weights are drawn after the rest, so a gap between methods is not their predictors' luck."""
    shape = dict(pred_depth=3, pred_cond_depth=2)  # a block after the first conditioned
    plain = make_model(latent="none", **shape).predictor.state_dict()
    for latent in ("oracle", "adassl_v"):
        conditioned = make_model(latent=latent, **shape).predictor.state_dict()
        extra = sorted(set(conditioned) - set(plain))
        assert extra and all("modulation" in k for k in extra), extra
        for key, value in plain.items():
            assert torch.equal(conditioned[key], value), f"{latent}: {key} differs from latent=none's"


# ---- rollout ------------------------------------------------------------------------------------------------------


class KnownPredictor(nn.Module):
    """Position t outputs tokens[t] + sum of all earlier inputs / 1000 + t + 100 * cond[t, 0] (every patch, dim)."""

    def trunk_features(self, tokens):
        return torch.cumsum(tokens, dim=1) - tokens  # what position t has seen before frame t

    def from_features(self, features, cond, tokens):
        t = torch.arange(tokens.shape[1], dtype=tokens.dtype)[None, :, None, None]
        shift = 0.0 if cond is None else 100 * cond[:, :, None, None, 0]
        return tokens + features / 1000 + t + shift


def test_rollout_indexing_with_a_known_predictor():
    model = make_model(latent="oracle")
    model.predictor = KnownPredictor()
    with torch.no_grad():
        model.latent.embed.weight.zero_()
        model.latent.embed.weight[0, 0] = 1.0  # r[0] = action[0]
        model.latent.embed.bias.zero_()
    context = torch.stack([torch.full((16, 32), 1.0), torch.full((16, 32), 3.0)])[None]  # frames 0, 1: [1, 2, N, D]
    actions = torch.tensor([[[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]]])  # transitions 1->2, 2->3, 3->4
    out = model.rollout(context, 3, "action", actions=actions)
    assert out.shape == (1, 1, 3, 16, 32)
    # each prediction is appended to the inputs and nothing else (one space): frame 2 = frame1 + frame0/1000 + 1 +
    # 100*a0 = 14.001; frame 3 = frame2 + (frame0 + frame1)/1000 + 2 + 20; frame 4 likewise from frames 0..3
    f2 = 3 + 1 / 1000 + 1 + 10
    f3 = f2 + 4 / 1000 + 2 + 20
    f4 = f3 + (4 + f2) / 1000 + 3 + 30
    torch.testing.assert_close(out[0, 0, :, 0, 0], torch.tensor([f2, f3, f4]))
    assert out[0, 0].std(dim=(1, 2)).max() == 0


@pytest.mark.parametrize("granularity", ["frame", "tokens"])
@pytest.mark.parametrize("latent", ["none", "oracle"])
def test_training_rollout_term_is_the_evaluated_rollout_in_one_space(granularity, latent, digits):
    """A k-step rollout is computed in the space it was trained in: the training rollout term is the loss of
    exactly `model.rollout` (the evaluators' function), whose step h reads the context and the h-1 earlier
    predictions and nothing else."""
    frames, action = digits
    model = make_model(latent=latent, granularity=granularity, rollout_steps=2).eval()
    perturb_conditioning(model)
    tokens, target = model.encode(frames), model.encode_target(frames)
    kwargs = {"actions": action[:, 1:]} if latent == "oracle" else {}
    mode = "action" if latent == "oracle" else "zero"
    rolled = model.rollout(tokens[:, :2], 2, mode, **kwargs)[0]  # frames 2, 3 from frames 0, 1
    cond = None if latent == "none" else model.latent(action)
    first = model.predictor(tokens[:, :2], None if cond is None else cond[:, :2])[:, -1]
    seq = torch.cat([tokens[:, :2], first[:, None]], dim=1)
    second = model.predictor(seq, None if cond is None else cond[:, :3])[:, -1]
    torch.testing.assert_close(rolled, torch.stack([first, second], dim=1))
    out = model(frames, action=action)
    torch.testing.assert_close(out["terms"]["rollout"], (rolled - target[:, 2:]).abs().mean())


def test_one_step_rollout_equals_teacher_forcing_with_the_posterior_mean(digits):
    frames, _ = digits
    model = make_model(latent="adassl_v").eval()
    perturb_conditioning(model)
    tokens, target = model.encode(frames), model.encode_target(frames)
    mu_q = model.infer_latents(tokens, target)["mu_q"]  # [B, 3, d]: transitions 0->1, 1->2, 2->3
    teacher = model.predictor(tokens[:, :3], mu_q)  # position t predicts frame t+1
    rolled = model.rollout(tokens[:, :3], 1, "posterior", future_tokens=target[:, 3:])
    torch.testing.assert_close(rolled[0, :, 0], teacher[:, 2])


def test_posterior_rollout_step_h_uses_future_frame_h(digits):
    frames, _ = digits
    model = make_model(latent="adassl_v", max_frames=8).eval()
    perturb_conditioning(model)
    tokens, target = model.encode(frames), model.encode_target(frames)
    future = target[:, 1:]  # frames 1..3 after one context frame
    out = model.rollout(tokens[:, :1], 3, "posterior", future_tokens=future)
    changed = future.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    out2 = model.rollout(tokens[:, :1], 3, "posterior", future_tokens=changed)
    torch.testing.assert_close(out2[:, :, 0], out[:, :, 0])
    assert not torch.allclose(out2[:, :, 1], out[:, :, 1])


@pytest.mark.parametrize("latent", ["adassl_v", "adassl_s"])
def test_prior_sample_gives_k_different_futures_and_prior_mean_one(latent, digits):
    frames, _ = digits
    model = make_model(latent=latent)
    model.train()
    model(frames)  # adassl_s: fills its marginal statistics
    model.eval()
    perturb_conditioning(model)
    tokens = model.encode(frames)
    generator = torch.Generator().manual_seed(0)
    samples = model.rollout(tokens[:, :2], 2, "prior_sample", k=5, generator=generator)
    assert samples.shape == (5, 8, 2, 1, 32)
    assert not torch.allclose(samples[0], samples[1])
    mean = model.rollout(tokens[:, :2], 2, "prior_mean", k=3)
    torch.testing.assert_close(mean[0], mean[2])


def test_none_rollout_is_deterministic_copies(digits):
    frames, _ = digits
    model = make_model(latent="none").eval()
    tokens = model.encode(frames)
    out = model.rollout(tokens[:, :2], 2, "prior_sample", k=3)
    assert out.shape == (3, 8, 2, 1, 32)
    torch.testing.assert_close(out[0], out[2])
    torch.testing.assert_close(out[0, :, 0], model.predictor(tokens[:, :2])[:, 1])


def test_rollout_rejects_bad_requests(digits):
    frames, _ = digits
    model = make_model(latent="adassl_v", max_frames=4)
    tokens = model.encode(frames)
    with pytest.raises(ValueError, match="needs future_tokens"):
        model.rollout(tokens[:, :2], 2, "posterior")
    with pytest.raises(ValueError, match="not available for latent=adassl_v"):
        model.rollout(tokens[:, :2], 2, "action", actions=torch.zeros(8, 2, 2))
    with pytest.raises(ValueError, match="max_frames=4"):
        model.rollout(tokens[:, :2], 4, "zero")
    with pytest.raises(ValueError, match="not available for latent=oracle"):
        make_model(latent="oracle").rollout(tokens[:, :2], 2, "prior_mean")
    with pytest.raises(ValueError, match=r"actions \[B, 2, A\]"):
        make_model(latent="oracle").rollout(tokens[:, :2], 2, "action", actions=torch.zeros(8, 3, 2))


# ---- training ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent", LATENT_KINDS)
def test_loss_goes_down_on_moving_digits(latent, digits):
    """With the encoders held fixed (so the targets do not move), the predictor and the latent modules learn to beat
    copy-last on real moving-digit clips."""
    frames, action = digits
    model = make_model(latent=latent)
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses, copy_last = [], []
    for _ in range(300):
        out = model(frames, action=action, beta=0.01)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.update_target(0.99)
        losses.append(out["terms"]["pred"].item())
        copy_last.append(out["monitors"]["copy_last"].item())
    assert np.isfinite(losses).all()
    last = np.mean(losses[-10:])
    baseline = np.mean(copy_last[-10:])
    assert last < 0.8 * baseline, f"{latent}: pred {last:.3f} vs copy-last {baseline:.3f}"


def test_default_config_forward_backward_reaches_every_trainable_weight():
    """Default ModelConfig (adassl_v), batch 4 x 8 frames of 64x64: one backward gives every trainable weight a
    finite gradient (nothing detached by mistake) and the EMA target encoder none (it only moves by update_target)."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig())
    frames = torch.randint(0, 256, (4, 8, 64, 64, 3), dtype=torch.uint8)
    out = model(frames, beta=0.01)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
