"""The inversion cache (invdpo_core/inversion_cache.py): an entry is reused only for the same record, the same model
and the same settings, however the output_dir or the cache directory is shared."""

import copy
import math
import shutil

import pytest
import torch

from invdpo_core import train as train_module
from invdpo_core.config import parse_config
from invdpo_core.data import PreferencePair
from invdpo_core.inversion import TARGETS, build_inverted_pairs, encode_prompts, inversion_grid, pair_coin
from invdpo_core.inversion_cache import InversionCache, entry_bytes, kept_points, layout_bytes
from invdpo_core.methods import all_points_backward, inversion_dpo_points
from invdpo_core.storage import list_files
from invdpo_core.testing import build_tiny_pipeline
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inversions(monkeypatch):
    """Pairs inverted so far (a list of batch sizes), counted at the reference inversion itself."""
    counted: list[int] = []
    real = train_module.build_inverted_pairs

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        counted.append(out.ref_err_w.shape[0])
        return out

    monkeypatch.setattr(train_module, "build_inverted_pairs", counting)
    return counted


def run_disk_cached(model, dataset, output_dir, inversions: list[int], cache_dir: str | None = None) -> int:
    """Train 2 steps of 2 pairs (the 4 pairs of a toy dataset) with a disk cache; the pairs this run inverted."""
    inversions.clear()
    config = {
        "base_model": str(model), "dataset": str(dataset), "resolution": 64, "inversion_steps": 4, "batch_size": 2,
        "max_steps": 2, "learning_rate": 1e-3, "beta": 500.0, "checkpoint_interval": 100,
        "output_dir": str(output_dir), "method": "inversion_dpo", "inversion_cache": "disk", "resume": False,
    }  # fmt: skip
    train(parse_config(config | ({"inversion_cache_dir": cache_dir} if cache_dir else {})))
    return sum(inversions)


def test_another_dataset_with_the_same_file_names_is_inverted_not_served_the_old_entries(
    tmp_path, model_dir, inversions
):
    # Two datasets whose records have the same keys ("manifest.jsonl line n") but other images.
    data_a = make_toy_dataset(tmp_path / "a", 4, model_dir=model_dir, seed=0)
    data_b = make_toy_dataset(tmp_path / "b", 4, model_dir=model_dir, seed=1)
    assert data_a.name == data_b.name == "manifest.jsonl"
    out = tmp_path / "run"
    assert run_disk_cached(model_dir, data_a, out, inversions) == 4
    assert run_disk_cached(model_dir, data_b, out, inversions) == 4  # a stale cache would invert none
    assert run_disk_cached(model_dir, data_a, out, inversions) == 0  # data_a's entries are still there, reused


def test_other_weights_under_the_same_model_path_are_inverted_again(tmp_path, model_dir, inversions):
    dataset = make_toy_dataset(tmp_path / "data", 4, model_dir=model_dir)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "run"
    assert run_disk_cached(model, dataset, out, inversions) == 4
    assert run_disk_cached(model, dataset, out, inversions) == 0
    shutil.rmtree(model)
    build_tiny_pipeline("sd15", seed=1).save_pretrained(model)  # a new base model at the same path
    assert run_disk_cached(model, dataset, out, inversions) == 4


def test_a_disk_cache_under_an_s3_prefix_is_shared_by_runs_and_keyed_the_same(s3_env, tmp_path, model_dir, inversions):
    data_a = make_toy_dataset(tmp_path / "a", 4, model_dir=model_dir, seed=0)
    data_b = make_toy_dataset(tmp_path / "b", 4, model_dir=model_dir, seed=1)
    cache_dir = f"s3://{s3_env}/inversion-cache"
    assert run_disk_cached(model_dir, data_a, tmp_path / "run1", inversions, cache_dir) == 4
    assert len(list_files(cache_dir)) == 4 and not (tmp_path / "run1" / "cache").exists()
    assert run_disk_cached(model_dir, data_a, tmp_path / "run2", inversions, cache_dir) == 0  # another run reuses
    assert run_disk_cached(model_dir, data_b, tmp_path / "run2", inversions, cache_dir) == 4  # other data does not
    assert len(list_files(cache_dir)) == 8


# ---------------------------------------------------------------- what an entry holds
N_STEPS = 6
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def world():
    """The tiny SD1.5 pipeline, 4 pairs of random latents (4x8x8) and their captions, and a perturbed policy."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    g = torch.Generator().manual_seed(1)
    z_w, z_l = torch.randn((4, 4, 8, 8), generator=g), torch.randn((4, 4, 8, 8), generator=g)
    prompts = ["a red circle", "a blue square"] * 2
    pairs = [PreferencePair(p, f"w{i}".encode(), f"l{i}".encode(), f"m.jsonl line {i}") for i, p in enumerate(prompts)]
    cond = encode_prompts(pipe, prompts, device=torch.device("cpu"), resolution=64)
    policy = copy.deepcopy(pipe.unet)
    with torch.no_grad():  # a policy that is not the reference: the loss is away from ln 2 and has a gradient
        for p in policy.parameters():
            p.add_(0.02 * p.std().nan_to_num(0) * torch.randn(p.shape, generator=g))
    return pipe, pairs, prompts, z_w, z_l, cond, policy


def make_cache(world, target, *, kind="memory", directory="unused", dtype="fp32", m=0):
    pipe, _, _, z_w, z_l, cond, _ = world

    def invert(batch, caps):
        index = [int(p.key.rsplit(" ", 1)[1]) for p in batch]
        built = build_inverted_pairs(
            pipe.unet, pipe.scheduler.config, z_w[index], z_l[index], cond.index(torch.tensor(index)),
            target=target, num_steps=N_STEPS, use_winner_noise=pair_coin(0, [p.key for p in batch]),
            storage_dtype=DTYPES[dtype],
        )  # fmt: skip
        return built, z_w[index], z_l[index]

    grid = inversion_grid(pipe.scheduler.config, N_STEPS)
    return InversionCache(
        kind, directory, invert, identity="test", target=target, dtype=DTYPES[dtype], points_per_pair=m, seed=0,
        grid=grid.timesteps, abar=grid.alphas_cumprod[grid.timesteps], device=torch.device("cpu"),
    )  # fmt: skip


@pytest.mark.parametrize("m", [0, 3])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("target", TARGETS)
def test_an_entry_holds_the_layout_and_nothing_else(world, tmp_path, target, dtype, m):
    _, pairs, prompts, *_ = world
    cache = make_cache(world, target, kind="disk", directory=str(tmp_path), dtype=dtype, m=m)
    cache.invert(pairs[:2], prompts[:2])
    for pair, caption in zip(pairs[:2], prompts[:2], strict=True):
        saved = torch.load(tmp_path / f"{cache.key(pair, caption)}.pt", weights_only=True)  # as torch.save wrote it
        assert entry_bytes(saved) == layout_bytes(target, m or N_STEPS, (4, 8, 8), DTYPES[dtype])
        # Every tensor owns exactly its bytes (no view saving a whole batch's storage).
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in saved.values())


@pytest.mark.parametrize("target", TARGETS)
def test_a_float32_entry_rebuilds_the_built_points_targets_and_reference_errors(world, target):
    pipe, pairs, prompts, z_w, z_l, cond, _ = world
    built = make_cache(world, target)._invert(pairs, prompts)[0]
    cache = make_cache(world, target, m=3)
    got = cache.batch(pairs, prompts)
    assert got.points.shape == (4, 3) and got.xt_w.shape == (4, 3, 4, 8, 8)
    for b, pair in enumerate(pairs):
        keep = kept_points(0, pair.key, N_STEPS, 3)
        assert torch.equal(got.points[b], keep)
        for name in ("xt_w", "xt_l", "target_w", "target_l", "ref_err_w", "ref_err_l"):
            torch.testing.assert_close(getattr(got, name)[b], getattr(built, name)[b, keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.timesteps, built.timesteps)


def test_kept_points_depend_only_on_the_seed_and_the_pair():
    a = kept_points(0, "m.jsonl line 1", 20, 4)
    assert torch.equal(a, kept_points(0, "m.jsonl line 1", 20, 4))  # a resumed run, another rank
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 4 and 0 <= a.min() and a.max() < 20
    others = {tuple(kept_points(0, f"m.jsonl line {i}", 20, 4).tolist()) for i in range(2, 12)}
    assert len(others) > 5  # pairs keep different points
    assert not torch.equal(a, kept_points(1, "m.jsonl line 1", 20, 4))
    assert torch.equal(kept_points(0, "m.jsonl line 1", 20, 0), torch.arange(20))


def test_training_draws_its_points_among_the_kept_ones(world):
    _, pairs, prompts, *_, cond, _ = world
    got = make_cache(world, "paired", m=2).batch(pairs, prompts)
    grid = got.timesteps
    for seed in range(5):
        points = inversion_dpo_points(
            got, cond, k=1, weights=torch.ones(N_STEPS), generator=torch.Generator().manual_seed(seed)
        )
        for b in range(4):
            assert points.timesteps[b].item() in grid[got.points[b]].tolist()


# Loss parity of each storage dtype against float32: |loss difference| and the relative L2 difference of the
# gradient, all N points of 4 pairs, beta 5000, a policy 2% away from the reference, the reference errors computed at
# the stored points (build_inverted_pairs storage_dtype). Measured on the tiny model (256 latent values per image; an
# SD latent has 16,384), worst of paired / x0 / step: fp16 loss 4.9e-5, gradient 0.09%; bf16 loss 2.8e-3, gradient
# 0.75%. The bounds: about 4x that.
PARITY = {"fp16": (2e-4, 0.005), "bf16": (1e-2, 0.03)}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("target", TARGETS)
def test_at_policy_equal_reference_the_loss_is_ln2_whatever_the_storage(world, target, dtype):
    # The reference errors are computed at the stored (rounded) points, so the policy == reference sees no margin.
    pipe, pairs, prompts, *_, cond, _ = world
    pairs_b = make_cache(world, target, dtype=dtype).batch(pairs, prompts)
    loss, metrics = all_points_backward(
        pipe.unet, pairs_b, cond, weights=torch.ones(N_STEPS), beta=5000.0, loss_type="sigmoid",
        backward=lambda surrogate: None,
    )  # fmt: skip
    assert metrics["rewards/margins"].abs().item() <= 1e-4
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("dtype", list(PARITY))
@pytest.mark.parametrize("target", ["paired", "x0", "step"])
def test_storage_dtype_keeps_the_loss_and_its_gradient(world, target, dtype):
    _, pairs, prompts, *_, cond, policy = world

    def loss_and_grad(storage):
        policy.zero_grad()
        loss, _ = all_points_backward(
            policy, make_cache(world, target, dtype=storage).batch(pairs, prompts), cond,
            weights=torch.ones(N_STEPS), beta=5000.0, loss_type="sigmoid",
        )  # fmt: skip
        return loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])

    loss32, grad32 = loss_and_grad("fp32")
    loss, grad = loss_and_grad(dtype)
    loss_tol, grad_tol = PARITY[dtype]
    assert abs(loss - loss32) <= loss_tol
    assert ((grad - grad32).norm() / grad32.norm()).item() <= grad_tol


# ---------------------------------------------------------------- the memory budget is the machine's
def test_the_memory_budget_is_half_the_ram_shared_by_the_local_processes(monkeypatch):
    assert train_module.memory_budget(8) == train_module.memory_budget(1) // 8

    class Accel:
        num_processes = 16  # two machines of 8

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train_module.local_processes(Accel()) == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train_module.local_processes(Accel()) == 16  # not told: as if all were on this machine


def test_a_memory_cache_over_its_share_of_the_machine_stops_with_the_clean_error(tmp_path, model_dir, monkeypatch):
    dataset = make_toy_dataset(tmp_path / "data", 4, model_dir=model_dir)
    config = {
        "base_model": str(model_dir), "dataset": str(dataset), "resolution": 64, "inversion_steps": 4,
        "batch_size": 2, "max_steps": 2, "checkpoint_interval": 100, "output_dir": str(tmp_path / "run"),
        "method": "inversion_dpo", "inversion_cache": "memory", "resume": False,
    }  # fmt: skip
    train(parse_config(config))  # one process: well within half the RAM
    # So many processes on this machine that one's share is below a single entry (a few KB): the clean error.
    ram_half = train_module.memory_budget(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ram_half // 1000))
    with pytest.raises(train_module.TrainError, match=r"half the RAM shared by \d+ processes on this machine"):
        train(parse_config(config))


@pytest.mark.parametrize("target", TARGETS)
def test_building_only_the_kept_points_gives_their_values_with_fewer_reference_calls(world, target):
    pipe, pairs, _, z_w, z_l, cond, _ = world
    b, m = len(pairs), 2
    keep = torch.stack([kept_points(0, p.key, N_STEPS, m) for p in pairs])  # (B, M)
    rows: list[int] = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))

    def build(kept):
        rows.clear()
        built = build_inverted_pairs(
            pipe.unet, pipe.scheduler.config, z_w, z_l, cond, target=target, num_steps=N_STEPS,
            use_winner_noise=pair_coin(0, [p.key for p in pairs]), keep=kept,
        )  # fmt: skip
        return built, sum(rows)

    try:
        every, calls_all = build(None)
        only, calls_kept = build(keep)
    finally:
        hook.remove()
    # Inversion rows: one image per pair for paired, both for the others; all N steps, or (kept points) each pair's
    # steps up to its deepest kept point.
    images = 1 if target == "paired" else 2
    deepest = int((keep.max(dim=1).values + 1).sum())
    assert deepest < b * N_STEPS  # some pair stops early (else this test would not see the saving)
    assert calls_all == b * images * N_STEPS + b * 2 * N_STEPS
    assert calls_kept == images * deepest + b * 2 * m
    assert torch.equal(only.points, keep)
    rows_idx = torch.arange(b)[:, None]
    for name in ("xt_w", "xt_l", "target_w", "target_l", "ref_err_w", "ref_err_l"):
        torch.testing.assert_close(getattr(only, name), getattr(every, name)[rows_idx, keep], atol=1e-5, rtol=1e-5)
