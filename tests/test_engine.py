"""Engine: network building, critic/generator steps, NaN handling, evaluation, Gaussian baseline,
and the steps under DistributedDataParallel (2 gloo processes)."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ldct.config import Config, HUNormalization, replace
from ldct.evaluation.baselines import evaluate_gaussian, gaussian_denoise, tune_gaussian_sigma
from ldct.training.engine import (
    NonFiniteLossError,
    build_networks,
    critic_step,
    evaluate,
    generator_step,
    train_iteration,
    use_amp,
)

NORM = HUNormalization()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second intra-op thread buys nothing, and on a shared 2-core machine the
    # OpenMP barriers of 2 threads stall whenever the other core is busy (5x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**train) -> Config:
    # lambda_adv 1e-3: in [0,1] units the L1 term is ~5e-3 while the Wasserstein term is O(1);
    # at lambda_adv = 1 and lr 1e-3 the untrained critic's gradient swamps the L1 signal.
    return replace(
        Config(),
        model={
            "encoder": "resnet10t",
            "out_indices": (2, 3, 4),
            "decoder_channels": 16,
            "critic_channels": 8,
        },
        loss={"perceptual_layer": 1, "perceptual_weights": "random", "lambda_adv": 1e-3},
        optim={"lr": 1e-3},
        train={"n_critic": 1, "batch_size": 4, "seed": 0, **train},
    )


def phantom_pairs(n: int, size: int | tuple[int, int], seed: int, noise_hu: float = 30.0):
    """(low, full) unit images [n,1,H,W]: soft-tissue discs with inserts in air, white noise."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    fulls = []
    for _ in range(n):
        img = np.full((h, w), -1000.0)
        cy, cx, r = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3), 0.45 * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 40.0
        for _ in range(3):
            iy, ix = cy + rng.uniform(-r / 2, r / 2), cx + rng.uniform(-r / 2, r / 2)
            img[(yy - iy) ** 2 + (xx - ix) ** 2 < (r / rng.uniform(3, 6)) ** 2] = rng.choice(
                [-80.0, 120.0, 300.0]
            )
        fulls.append(img)
    full = np.stack(fulls)[:, None]
    low = full + rng.normal(0.0, noise_hu, full.shape)
    as_unit = lambda a: NORM.to_unit(torch.from_numpy(a).float())  # noqa: E731
    return as_unit(low), as_unit(full)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def test_build_networks_is_seeded_and_uses_the_config():
    cfg = replace(tiny_config(), optim={"lr": 2e-4, "critic_lr_ratio": 0.5})
    a, b = build_networks(cfg, "cpu"), build_networks(cfg, "cpu")
    assert torch.equal(flat_params(a.generator), flat_params(b.generator))
    assert torch.equal(flat_params(a.critic), flat_params(b.critic))
    assert a.opt_g.param_groups[0]["lr"] == 2e-4 and a.opt_c.param_groups[0]["lr"] == 1e-4
    assert a.opt_g.param_groups[0]["betas"] == (0.5, 0.9)
    assert a.perceptual.weights_source == "random(seed=0)"
    assert not a.amp and not a.scaler_g.is_enabled()
    other = build_networks(replace(cfg, train={"seed": 1}), "cpu")
    assert not torch.equal(flat_params(a.critic), flat_params(other.critic))


def test_precision_choice():
    assert not use_amp("auto", "cpu") and not use_amp("fp16", "cpu")
    assert use_amp("auto", "cuda") and use_amp("fp16", "cuda:1") and not use_amp("fp32", "cuda")
    with pytest.raises(ValueError, match="train.precision"):
        use_amp("bf17", "cpu")


def test_critic_and_generator_steps_update_only_their_network():
    torch.manual_seed(0)
    cfg = tiny_config()
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=0)
    g0, c0 = flat_params(nets.generator), flat_params(nets.critic)
    logs = critic_step(nets, low, full, cfg, step=1)
    assert set(logs) == {"loss_critic", "wasserstein", "gp"} and all(np.isfinite(list(logs.values())))
    g1, c1 = flat_params(nets.generator), flat_params(nets.critic)
    assert not torch.equal(c0, c1)
    # Only BN running statistics may move in the generator during a critic step, not weights.
    assert torch.equal(g0, g1)
    logs = generator_step(nets, low, full, cfg, step=1)
    assert set(logs) == {"loss_g", "adv", "l1", "perceptual"} and all(np.isfinite(list(logs.values())))
    assert not torch.equal(g1, flat_params(nets.generator))
    assert torch.equal(c1, flat_params(nets.critic))
    assert all(p.requires_grad for p in nets.critic.parameters())


def test_critic_steps_raise_the_wasserstein_estimate():
    torch.manual_seed(0)
    cfg = tiny_config()
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=1, noise_hu=200.0)
    first = critic_step(nets, low, full, cfg, step=1)
    for s in range(2, 8):
        last = critic_step(nets, low, full, cfg, step=s)
    assert last["loss_critic"] < first["loss_critic"]


def test_train_iteration_draws_fresh_batches_and_averages_critic_logs():
    cfg = tiny_config(n_critic=2)
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=2)
    calls = []

    def next_batch():
        calls.append(1)
        return low, full

    logs = train_iteration(nets, next_batch, cfg, step=1)
    assert len(calls) == 3
    assert set(logs) == {"loss_g", "adv", "l1", "perceptual", "loss_critic", "wasserstein", "gp"}


def test_overfitting_a_few_patches_raises_psnr():
    torch.manual_seed(0)
    cfg = tiny_config(n_critic=1)
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 64, seed=3)
    for step in range(1, 51):
        train_iteration(nets, lambda: (low, full), cfg, step)
    result = evaluate(nets.generator, zip(low, full, [{}] * 4, strict=True), NORM, "cpu")
    gain = result["denoised"]["psnr_window"] - result["ldct"]["psnr_window"]
    assert gain > 2.5, result  # ~ +4.5 dB after 50 steps on the development machine


def test_forced_nan_names_step_and_loss_and_does_not_step():
    cfg = tiny_config(debug_nan_step=2)
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=4)
    train_iteration(nets, lambda: (low, full), cfg, step=1)
    before = flat_params(nets.generator)
    with pytest.raises(NonFiniteLossError) as info:
        generator_step(nets, low, full, cfg, step=2)
    err = info.value
    assert err.step == 2 and np.isnan(err.losses["loss_g"])
    assert "non-finite loss_g (nan) at step 2" in str(err) and "learning rate" in str(err)
    assert torch.equal(before, flat_params(nets.generator))
    assert all(p.requires_grad for p in nets.critic.parameters())
    # Picklable with its fields (Ray ships exceptions between processes).
    copy = pickle.loads(pickle.dumps(NonFiniteLossError(5, {"gp": float("inf")}, last_checkpoint="/c/5")))
    assert copy.step == 5 and "gp (inf) at step 5" in str(copy) and "/c/5" in str(copy)


def test_evaluate_whole_slices_of_different_sizes():
    cfg = tiny_config()
    nets = build_networks(cfg, "cpu")
    nets.generator.train()
    a_low, a_full = phantom_pairs(1, (48, 40), seed=5)
    b_low, b_full = phantom_pairs(1, 64, seed=6)
    slices = [(a_low[0], a_full[0], {"patient": "A"}), (b_low[:1], b_full[:1], {"patient": "B"})]
    result = evaluate(nets.generator, slices, NORM, "cpu")
    assert set(result) == {"ldct", "denoised"}
    # The untrained generator is the identity: both rows agree.
    for name, value in result["ldct"].items():
        assert result["denoised"][name] == pytest.approx(value), name
    assert nets.generator.training  # mode restored
    one = evaluate(nets.generator, slices, NORM, "cpu", max_slices=1)
    assert one["ldct"]["psnr_window"] != pytest.approx(result["ldct"]["psnr_window"])


def test_gaussian_baseline():
    # Strong noise: with the phantoms' sharp air/tissue edges, smoothing pays off clearly only
    # when the noise dominates the error.
    low, full = phantom_pairs(3, 64, seed=7, noise_hu=100.0)
    hu = NORM.to_hu(low[0, 0]).numpy()
    smoothed = gaussian_denoise(hu, 1.0)
    assert isinstance(smoothed, np.ndarray) and smoothed.shape == hu.shape and smoothed.dtype == hu.dtype
    as_tensor = gaussian_denoise(torch.from_numpy(hu), 1.0)
    assert isinstance(as_tensor, torch.Tensor) and np.allclose(as_tensor.numpy(), smoothed)
    assert np.array_equal(gaussian_denoise(hu, 0.0), hu)
    slices = [(low[i], full[i], {}) for i in range(3)]
    sigma = tune_gaussian_sigma(slices, NORM)
    assert sigma > 0
    scored = evaluate_gaussian(slices, sigma, NORM)
    ldct = evaluate_gaussian(slices, 0.0, NORM)
    assert scored["psnr_window"] > ldct["psnr_window"] + 2.0
    with pytest.raises(ValueError, match="sigma"):
        gaussian_denoise(hu, -1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = tiny_config(n_critic=1)
        nets = build_networks(cfg, "cpu")
        nets.generator, nets.critic = DDP(nets.generator), DDP(nets.critic)
        low, full = phantom_pairs(2, 32, seed=10 + rank)  # different data on each rank
        torch.manual_seed(rank)
        train_iteration(nets, lambda: (low, full), cfg, step=1)
        torch.save({"g": flat_params(nets.generator), "c": flat_params(nets.critic)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_steps_under_ddp_keep_ranks_equal(tmp_path):
    # DDP + the penalty's double backward (create_graph) on gloo: both ranks must end with the
    # same weights although they saw different data, and the weights must have moved.
    out = str(tmp_path / "params")
    mp.start_processes(_ddp_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    init = build_networks(tiny_config(), "cpu")
    for key, net in (("g", init.generator), ("c", init.critic)):
        assert torch.equal(r0[key], r1[key]), key
        assert not torch.equal(r0[key], flat_params(net)), key


def _ddp_nan_worker(rank: int, port: int, out: str) -> None:
    import datetime
    import json
    import time

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    # A short collective timeout: without the shared finite flag, rank 0 would sit in DDP's
    # gradient all-reduce until this expires (30 min by default) and report a timeout instead.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        cfg = tiny_config(n_critic=1, debug_nan_step=2, debug_nan_rank=1)
        nets = build_networks(cfg, "cpu")
        nets.generator, nets.critic = DDP(nets.generator), DDP(nets.critic)
        low, full = phantom_pairs(2, 32, seed=10 + rank)
        started = time.perf_counter()
        outcome = {"rank": rank}
        try:
            for step in (1, 2, 3):
                train_iteration(nets, lambda: (low, full), cfg, step=step)
            outcome["error"] = None
        except NonFiniteLossError as exc:
            outcome.update(error=str(exc), step=exc.step, ranks=exc.ranks)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion message
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["seconds"] = time.perf_counter() - started
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(outcome, fh)
    finally:
        dist.destroy_process_group()


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import json

    out = str(tmp_path / "outcome")
    mp.start_processes(_ddp_nan_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    outcomes = [json.loads(open(f"{out}.{rank}").read()) for rank in (0, 1)]
    for o in outcomes:
        assert o.get("step") == 2, o  # the same NonFiniteLossError on both ranks, same step
        assert o["ranks"] == {"loss_g": 1}, o
        assert "at step 2" in o["error"] and "loss_g" in o["error"] and "on rank 1" in o["error"], o
        assert o["seconds"] < 25, o  # not a collective timeout
    assert "loss_g (nan on rank 1)" in outcomes[1]["error"]
    assert "loss_g (non-finite on rank 1)" in outcomes[0]["error"]


@pytest.mark.parametrize(
    ("which", "value", "step_fn"),
    [("loss_critic", "nan", critic_step), ("loss_g", "inf", generator_step)],
)
def test_debug_hook_poisons_the_named_loss(which, value, step_fn):
    cfg = tiny_config(debug_nan_step=3, debug_nan_loss=which, debug_nan_value=value)
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=4)
    step_fn(nets, low, full, cfg, step=2)  # other steps untouched
    with pytest.raises(NonFiniteLossError, match=rf"non-finite {which} \({value}\) at step 3"):
        step_fn(nets, low, full, cfg, step=3)
    # The other network's step at that step is untouched.
    other = generator_step if step_fn is critic_step else critic_step
    assert all(np.isfinite(list(other(nets, low, full, cfg, step=3).values())))


def test_gradient_penalty_is_taken_in_the_critics_standardised_units():
    import copy

    from ldct.losses import gradient_penalty

    cfg = tiny_config()
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=8, noise_hu=100.0)
    with torch.no_grad():
        # An untrained critic's input gradient is ~0 in any units (penalty ~1 both ways): make
        # it steep enough for the units to matter.
        nets.critic.score.weight.mul_(300.0)
    critic = copy.deepcopy(nets.critic)  # the critic as critic_step sees it, before its update
    with torch.no_grad():
        fake = nets.generator(low)
    assert float(critic.standardize.scale) == pytest.approx(0.05)  # 204.8 HU of 4096
    torch.manual_seed(0)
    logged = critic_step(nets, low, full, cfg, step=1)["gp"]
    torch.manual_seed(0)  # the same per-sample alphas
    in_z = gradient_penalty(critic.score_standardized, critic.standardize(full), critic.standardize(fake))
    torch.manual_seed(0)
    in_unit = gradient_penalty(critic, full, fake)
    assert logged == pytest.approx(in_z.item(), rel=1e-5)
    # In [0,1] units the same critic's input gradient is 1/scale = 20x larger: another penalty.
    assert in_unit.item() > 10 * in_z.item(), (in_unit.item(), in_z.item())


def test_lr_schedule_warmup_cosine_and_constant():
    from ldct.training.engine import lr_factor

    const = tiny_config(iterations=100)
    assert [lr_factor(const, s) for s in (1, 50, 100)] == [1.0, 1.0, 1.0]
    cfg = replace(const, optim={"schedule": "warmup_cosine", "warmup": 10, "min_lr_ratio": 0.1})
    assert lr_factor(cfg, 1) == pytest.approx(0.1) and lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_factor(cfg, 100) == pytest.approx(0.1)
    nets = build_networks(cfg, "cpu")
    low, full = phantom_pairs(4, 32, seed=9)
    train_iteration(nets, lambda: (low, full), cfg, step=5)
    assert nets.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    assert nets.opt_c.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_factor(replace(const, optim={"schedule": "step"}), 1)


def test_uneven_rank_shares_average_to_the_global_batch_gradient():
    """Elastic DDP can run 3 workers on a batch of 5 (2, 2, 1 samples): with each rank's loss
    weighted by rank_share, the equal-weight average of the ranks' gradients (what DDP's
    all-reduce computes) is the gradient of the whole batch's mean loss; unweighted it is not."""
    import copy

    from ldct.training.engine import generator_step, rank_share

    assert rank_share(43, 3, 128) == pytest.approx(129 / 128) and rank_share(64, 2, 128) == 1.0
    cfg = tiny_config(batch_size=5)
    cfg = replace(cfg, loss={"lambda_adv": 0.0, "lambda_perceptual": 0.0})  # L1 alone: no critic
    torch.manual_seed(0)
    start = build_networks(cfg, "cpu")
    assert start.critic is None
    start.generator.eval()  # BatchNorm on running statistics: a sample's gradient ignores its batch
    low, full = phantom_pairs(5, 32, seed=3)
    low, full = torch.as_tensor(low), torch.as_tensor(full)
    parts = [(0, 2), (2, 4), (4, 5)]

    def grads(nets) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in nets.generator.named_parameters() if p.grad is not None}

    whole = copy.deepcopy(start)
    generator_step(whole, low, full, cfg, step=1)
    expected = grads(whole)
    averaged = {}
    for weighted in (True, False):
        per_rank = []
        for a, b in parts:
            nets = copy.deepcopy(start)
            share = rank_share(b - a, 3, 5) if weighted else 1.0
            generator_step(nets, low[a:b], full[a:b], cfg, step=1, share=share)
            per_rank.append(grads(nets))
        averaged[weighted] = {n: sum(g[n] for g in per_rank) / 3 for n in expected}
    assert expected and any(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(averaged[True][name], grad, rtol=1e-4, atol=1e-8)
    assert any(not torch.allclose(averaged[False][n], g, rtol=1e-3, atol=1e-8) for n, g in expected.items())


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_ranks_split_each_global_batch_exactly_once(world):
    """Every group size an elastic range allows covers global batch b with its ranks' slices, in
    order, whether or not it divides the batch, so a resize resumes the same sample sequence."""
    from ldct.training.loop import _StepBatchSampler

    per_rank = [list(_StepBatchSampler(10, r, world, start_batch=3, total_batches=6)) for r in range(world)]
    for i, b in enumerate(range(3, 6)):
        joined = [idx for rank in per_rank for idx in rank[i]]
        assert joined == list(range(b * 10, (b + 1) * 10))
        sizes = [len(rank[i]) for rank in per_rank]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="batch_size=2 is smaller than 3 workers"):
        _StepBatchSampler(2, 0, 3, 0, 1)
