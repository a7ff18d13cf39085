"""convert.from_torch / convert.to_torch: every wrapper and layout, parity with timm, round trips, bad input."""
import argparse
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util

from configs.presets import SMOKE_OVERRIDES
from convert import from_torch, to_torch, verify
from rsd_jax import model_dir, models
from timm_parity import max_rel_err, randomize_batchnorm_stats

# name -> (our overrides for a tiny variant, the same architecture in timm's kwargs, written out independently)
TINY = {
    "resnet18": (dict(widths=(16, 32, 64, 128), layers=(1, 1, 1, 1), img_size=32),
                 dict(channels=(16, 32, 64, 128), layers=(1, 1, 1, 1))),
    "resnet34": (dict(widths=(8, 16, 16, 32), layers=(1, 2, 1, 1), img_size=32),
                 dict(channels=(8, 16, 16, 32), layers=(1, 2, 1, 1))),
    "resnet50": (dict(widths=(8, 16, 32, 64), layers=(1, 1, 2, 1), img_size=32),
                 dict(channels=(8, 16, 32, 64), layers=(1, 1, 2, 1))),
    "vit_small_patch16_224": (dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4),
                              dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)),
    "vit_base_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=2, mlp_ratio=2.0),
                             dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=2, mlp_ratio=2.0)),
    "deit_tiny_patch16_224": (dict(img_size=48, patch_size=16, embed_dim=192, depth=2, num_heads=3),
                              dict(img_size=48, patch_size=16, embed_dim=192, depth=2, num_heads=3)),
}
NAMES = list(TINY)


def random_timm(name, seed, num_classes, **kwargs):
    torch.manual_seed(seed)
    return randomize(timm.create_model(name, num_classes=num_classes, **kwargs), seed)


def randomize(model, seed):
    """`model` in eval mode with every parameter and BatchNorm statistic random and O(1) activations, so that a
    wrong mapping of any tensor (biases, norms, CLS token, ...) shows in the outputs."""
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2 and n not in ("cls_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif n.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    randomize_batchnorm_stats(model, seed)
    return model


def stage_modules(model, flax_model):
    if hasattr(model, "layer1"):
        return [getattr(model, f"layer{s}") for s in (1, 2, 3, 4)]
    return [model.blocks[b] for b in flax_model.reference_stage_indices()]


def assert_parity(tm, flax_model, variables, batch, seed, with_stages=True):
    """Logits, pre-logits and (`with_stages`) the four stage features of the converted model equal timm's (1e-4
    relative)."""
    size = flax_model.img_size
    x = np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)
    stages = []
    hooks = [m.register_forward_hook(lambda m, i, o: stages.append(o.numpy()))
             for m in (stage_modules(tm, flax_model) if with_stages else ())]
    with torch.no_grad():
        feats = tm.forward_features(torch.from_numpy(x))
        pre, logits = tm.forward_head(feats, pre_logits=True).numpy(), tm.forward_head(feats).numpy()
    for h in hooks:
        h.remove()
    stages = [s.transpose(0, 2, 3, 1) if s.ndim == 4 else s for s in stages]
    got, feats = jax.jit(lambda v, x: flax_model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
    errs = [max_rel_err(got, logits), max_rel_err(feats["pre_logits"], pre)]
    errs += [max_rel_err(feats[f"stage{s + 1}"], stages[s]) for s in range(len(stages))]
    assert max(errs) < 1e-4, errs
    return errs


def wrap(state_dict, form):
    """The ways checkpoints arrive: raw, timm/reference wrappers, DDP and torch.compile prefixes."""
    if form == "raw":
        return state_dict
    if form == "wrapped":
        return {"state_dict": state_dict}
    if form == "ddp":
        return {"module." + k: v for k, v in state_dict.items()}
    if form == "model":
        return {"model": {"_orig_mod." + k: v for k, v in state_dict.items()}}
    if form == "reference":   # the reference's training checkpoint (timm 0.6.x CheckpointSaver)
        return {"epoch": 1, "arch": "x", "state_dict": state_dict, "optimizer": {}, "version": 2,
                "args": argparse.Namespace(lr=0.1, model="x"), "metric": 1.0}
    raise ValueError(form)


def flat(variables):
    return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))


def assert_identical(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def cli(module, *argv):
    return module.main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,form", list(zip(NAMES, ["raw", "wrapped", "ddp", "reference", "model", "raw"])))
def test_full_size_checkpoint_converts_with_inferred_model(name, form, tmp_path, capsys):
    tm = random_timm(name, 0, 100)
    torch.save(wrap(tm.state_dict(), form), tmp_path / "ckpt.pth")
    assert cli(from_torch, tmp_path / "ckpt.pth", "--out", tmp_path / "flax") == 0
    assert f"inferred model: {name}, 100 classes" in capsys.readouterr().out
    flax_model, variables = models.load_model(tmp_path / "flax")
    assert (type(flax_model).__name__, flax_model.num_classes) == (type(models.create_model(name)).__name__, 100)
    print(name, form, "max rel err logits/pre_logits/stage1-4:",
          ["%.1e" % e for e in assert_parity(tm, flax_model, variables, batch=1, seed=0)])


@pytest.mark.parametrize("name", NAMES)
def test_tiny_all_wrappers_parity_and_round_trip(name, tmp_path):
    overrides, timm_kwargs = TINY[name]
    tm = random_timm(name, 1, 10, **timm_kwargs)
    sd = tm.state_dict()
    converted = {}
    for form in ("raw", "wrapped", "ddp"):
        torch.save(wrap(sd, form), tmp_path / f"{form}.pth")
        args = [tmp_path / f"{form}.pth", "--out", tmp_path / form, "--model", name]
        for k, v in overrides.items():   # explicit, although ResNet's would be inferred
            args += ["--override", f"{k}={v!r}"]
        assert cli(from_torch, *args) == 0
        converted[form] = models.load_model(tmp_path / form)
    flax_model, variables = converted["raw"]
    assert flax_model.num_classes == 10
    for form in ("wrapped", "ddp"):
        assert_identical(converted[form][1], variables)
    assert_parity(tm, flax_model, variables, batch=2, seed=1)

    # Flax -> torch: timm loads it strictly and gives the same logits; torch -> Flax gives the same variables.
    assert cli(to_torch, tmp_path / "raw", "--out", tmp_path / "back.pth") == 0
    exported = torch.load(tmp_path / "back.pth", weights_only=True)
    fresh = timm.create_model(name, num_classes=10, **timm_kwargs).eval()
    fresh.load_state_dict(exported, strict=True)
    x = torch.randn(2, 3, flax_model.img_size, flax_model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tm(x), rtol=0, atol=0)
    assert cli(from_torch, tmp_path / "back.pth", "--out", tmp_path / "again", "--model", name,
               *[f"--override={k}={v!r}" for k, v in overrides.items()]) == 0
    assert_identical(models.load_model(tmp_path / "again")[1], variables)


@pytest.mark.parametrize("name", NAMES)
def test_model_inference_from_keys_and_shapes(name):
    sd = timm.create_model(name, num_classes=37, device="meta").state_dict()
    assert from_torch.infer_model(sd) == (name, 37, {})
    assert from_torch.infer_model(from_torch.strip_prefixes({"module." + k: v for k, v in sd.items()}))[:2] \
        == (name, 37)


@pytest.mark.parametrize("name", list(SMOKE_OVERRIDES))
def test_verify_builds_timm_equal_to_smoke_variant(name):
    """verify.create_timm builds every smoke variant, also those timm's registered entry points cannot."""
    overrides = SMOKE_OVERRIDES[name]
    tm = randomize(verify.create_timm(name, 10, overrides), seed=11)
    variables = from_torch.convert_state_dict(
        {k: v.numpy() for k, v in tm.state_dict().items()}, name, 10, overrides)
    flax_model = models.create_model(name, 10, **overrides)
    assert flax_model.img_size == 32
    print(name, "max rel err logits/pre_logits:",
          ["%.1e" % e for e in assert_parity(tm, flax_model, variables, batch=2, seed=12, with_stages=False)])


def test_inference_of_tiny_variants():
    overrides, timm_kwargs = TINY["resnet50"]
    sd = timm.create_model("resnet50", num_classes=5, device="meta", **timm_kwargs).state_dict()
    assert from_torch.infer_model(sd) == ("resnet50", 5, {"layers": (1, 1, 2, 1), "widths": (8, 16, 32, 64)})
    sd = timm.create_model("resnet18", num_classes=5, device="meta", layers=(3, 4, 6, 3)).state_dict()
    assert from_torch.infer_model(sd) == ("resnet34", 5, {})
    # ViT: all but the head count is in the shapes; an unregistered width guesses 64-wide heads.
    sd = timm.create_model("vit_small_patch16_224", num_classes=5, device="meta", **TINY["vit_small_patch16_224"][1])
    name, classes, inferred = from_torch.infer_model(sd.state_dict())
    assert (classes, inferred) == (5, dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=1))
    sd = timm.create_model("deit_tiny_patch16_224", num_classes=5, device="meta", **TINY["deit_tiny_patch16_224"][1])
    assert from_torch.infer_model(sd.state_dict()) == ("deit_tiny_patch16_224", 5, dict(img_size=48, depth=2))


def test_cli_infers_tiny_vit_given_its_head_count(tmp_path, capsys):
    overrides, timm_kwargs = TINY["vit_small_patch16_224"]
    tm = random_timm("vit_small_patch16_224", 2, 7, **timm_kwargs)
    torch.save(tm.state_dict(), tmp_path / "vit.pth")
    assert cli(from_torch, tmp_path / "vit.pth", "--out", tmp_path / "out", "--override", "num_heads=4",
               "--verify") == 0
    out = capsys.readouterr().out
    assert "verify logits: max abs diff" in out and "verify pre_logits" in out and "note: num_heads" not in out
    assert cli(from_torch, tmp_path / "vit.pth", "--out", tmp_path / "guessed") == 0
    assert "note: num_heads=1 is a guess" in capsys.readouterr().out
    flax_model, variables = models.load_model(tmp_path / "out")
    assert flax_model.num_heads == 4 and flax_model.embed_dim == 64
    assert_parity(tm, flax_model, variables, batch=2, seed=2)


def test_reference_training_checkpoint_and_ema(tmp_path, capsys):
    overrides, timm_kwargs = TINY["resnet18"]
    student, ema = random_timm("resnet18", 3, 10, **timm_kwargs), random_timm("resnet18", 4, 10, **timm_kwargs)
    ckpt = wrap(student.state_dict(), "reference")
    ckpt["state_dict_ema"] = ema.state_dict()
    ckpt["arch"] = "resnet18"
    torch.save(ckpt, tmp_path / "last.pth.tar")
    assert cli(from_torch, tmp_path / "last.pth.tar", "--out", tmp_path / "plain") == 0
    assert cli(from_torch, tmp_path / "last.pth.tar", "--out", tmp_path / "ema", "--use_ema") == 0
    assert_parity(student, *models.load_model(tmp_path / "plain"), batch=2, seed=3)
    assert_parity(ema, *models.load_model(tmp_path / "ema"), batch=2, seed=3)
    meta = model_dir.read_model_metadata(tmp_path / "ema")
    assert meta["source_entry"] == "state_dict_ema" and meta["overrides"]["layers"] == [1, 1, 1, 1]
    assert len(meta["source_sha256"]) == 64 and meta["layout"].startswith("timm-1.x")


class Evil:
    """Pickles as a call to `call(command)`: a checkpoint must never run it."""

    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        return self.call, (["touch", str(self.marker)],)


def test_objects_in_checkpoint_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    tm = random_timm("resnet18", 5, 10, **TINY["resnet18"][1])
    # subprocess.call in the training args loads as an inert placeholder; the weights still convert.
    torch.save(dict(wrap(tm.state_dict(), "reference"), args=Evil(subprocess.call, marker)), tmp_path / "evil.pth")
    assert cli(from_torch, tmp_path / "evil.pth", "--out", tmp_path / "out") == 0
    assert not marker.exists()
    assert_parity(tm, *models.load_model(tmp_path / "out"), batch=1, seed=5)
    # os.system torch refuses outright: a one-line error.
    torch.save(dict(wrap(tm.state_dict(), "reference"), args=Evil(os.system, marker)), tmp_path / "evil2.pth")
    assert cli(from_torch, tmp_path / "evil2.pth", "--out", tmp_path / "out2") == 2
    assert "system" in capsys.readouterr().err and not marker.exists() and not (tmp_path / "out2").exists()


def test_library_api(tmp_path):
    overrides, timm_kwargs = TINY["resnet18"]
    tm = random_timm("resnet18", 6, 10, **timm_kwargs)
    sd = tm.state_dict()
    from_tensors = from_torch.convert_state_dict(sd, "resnet18", **{"overrides": overrides})
    from_numpy = from_torch.convert_state_dict({k: v.numpy() for k, v in sd.items()}, "resnet18", 10, overrides)
    assert_identical(from_tensors, from_numpy)
    before = np.array(from_tensors["params"]["fc"]["bias"])
    with torch.no_grad():
        tm.fc.bias.add_(1.0)   # the variables are copies, not views of the caller's tensors
    np.testing.assert_array_equal(from_tensors["params"]["fc"]["bias"], before)
    with pytest.raises(from_torch.ConvertError, match="10 classes"):
        from_torch.convert_state_dict(sd, "resnet18", 100, overrides)
    with pytest.raises(from_torch.ConvertError) as e:   # every problem on both sides, in one message
        from_torch.convert_state_dict({**sd, "junk": torch.zeros(1)}, "resnet18", 10,
                                      dict(overrides, layers=(2, 1, 1, 1)))
    assert "junk" in str(e.value) and "layer1.1.conv1.weight" in str(e.value)


def test_verify_fails_when_numerics_differ(monkeypatch, capsys):
    overrides, timm_kwargs = TINY["resnet18"]
    variables = from_torch.convert_state_dict(random_timm("resnet18", 7, 10, **timm_kwargs).state_dict(),
                                              "resnet18", 10, overrides)
    diffs = verify.check("resnet18", 10, overrides, variables)
    assert max(rel for _, rel in diffs.values()) < 1e-6
    from rsd_jax.models import layers
    wrong_eps = layers.batch_norm
    monkeypatch.setattr(layers, "batch_norm", lambda train, **kw: wrong_eps(train, **dict(kw, epsilon=1e-1)))
    with pytest.raises(verify.VerifyError, match="verification failed: logits, pre_logits"):
        verify.check("resnet18", 10, overrides, variables)
    assert "max rel diff" in capsys.readouterr().out


def test_to_torch_workdir_and_refusals(tmp_path, capsys):
    overrides, timm_kwargs = TINY["vit_small_patch16_224"]
    tm = random_timm("vit_small_patch16_224", 8, 10, **timm_kwargs)
    variables = from_torch.convert_state_dict(tm.state_dict(), "vit_small_patch16_224", 10, overrides)
    # A training workdir's student, with an option timm does not know but that changes no weight.
    models.save_model(tmp_path / "work" / "student", "vit_small_patch16_224", 10, variables,
                      overrides=dict(overrides, stage_blocks=(0, 1, 2, 3)))
    assert cli(to_torch, tmp_path / "work", "--out", tmp_path / "student.pth", "--verify") == 0
    assert "num_heads=4" in capsys.readouterr().out
    fresh = timm.create_model("vit_small_patch16_224", num_classes=10, **timm_kwargs).eval()
    fresh.load_state_dict(torch.load(tmp_path / "student.pth", weights_only=True), strict=True)

    # A ResNet stem width timm's create_model cannot build: refused, nothing written.
    r_over = dict(TINY["resnet18"][0], stem_width=32)
    r_vars = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                    models.init_shapes(models.create_model("resnet18", 10, **r_over)))
    models.save_model(tmp_path / "wide", "resnet18", 10, r_vars, overrides=r_over)
    assert cli(to_torch, tmp_path / "wide", "--out", tmp_path / "wide.pth") == 2
    err = capsys.readouterr().err
    assert "stem_width" in err and "timm" in err and not (tmp_path / "wide.pth").exists()
    assert cli(to_torch, tmp_path / "nowhere", "--out", tmp_path / "x.pth") == 2
    assert cli(to_torch, tmp_path / "work", "--out", tmp_path / "student.pth") == 2   # exists: not overwritten


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit status 2, nothing left behind

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    tm = random_timm("resnet18", 9, 10, **TINY["resnet18"][1])
    torch.save(tm.state_dict(), d / "good.pth")
    return d, tm.state_dict()


def bad_inputs(d, sd):
    (d / "text.pth").write_text("not a checkpoint\n")
    (d / "truncated.pth").write_bytes((d / "good.pth").read_bytes()[:5000])
    torch.save({k: v for k, v in sd.items() if k != "fc.bias"}, d / "missing_key.pth")
    torch.save(dict(sd, **{"head.extra": torch.zeros(3)}), d / "extra_key.pth")
    return [
        (["text.pth"], "not a torch checkpoint"),
        (["truncated.pth"], "truncated"),
        (["absent.pth"], "no such file"),
        (["missing_key.pth"], "missing in checkpoint: fc.bias"),
        (["extra_key.pth"], "unexpected in checkpoint: head.extra"),
        (["good.pth", "--model", "deit_tiny_patch16_224"], "not a deit_tiny_patch16_224"),
        (["good.pth", "--model", "resnet50"], "does not fit resnet50"),
        (["good.pth", "--num_classes", "100"], "has 10 classes"),
        (["good.pth", "--use_ema"], "state_dict_ema"),
        (["good.pth", "--model", "resnet18", "--override", "nonsense=1"], "unknown model option"),
        (["good.pth", "--override", "widths=abc"], "is not of the kind of its default"),
    ]


def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, capsys):
    d, sd = tiny_checkpoint
    for args, message in bad_inputs(d, sd):
        out = d / "out"
        assert cli(from_torch, d / args[0], "--out", out, *args[1:]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, (args, err)
        assert not [p for p in os.listdir(d) if p.startswith("out")], args   # no directory, no temporary
    (d / "taken").mkdir()
    assert cli(from_torch, d / "good.pth", "--out", d / "taken") == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("module", [from_torch, to_torch])
@pytest.mark.parametrize("out,message", [("file/x", "file is not a directory"), ("/proc/x", "cannot write in /proc")])
def test_unwritable_out_is_refused_before_loading(module, out, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    # The source does not exist either: the --out error comes first, before anything is loaded.
    assert cli(module, tmp_path / "absent", "--out", tmp_path / out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "\n" not in err and message in err, err


# The write is interrupted from inside: after orbax's save (from_torch) or torch.save (to_torch) has filled the
# temporary, the process signals itself.
INTERRUPTED_WRITE = """
import os, signal, sys
import orbax.checkpoint, torch
from convert import {module}
owner, name = {target}
write = getattr(owner, name)
def interrupted(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
setattr(owner, name, interrupted)
sys.exit({module}.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module,target,sig", [
    ("from_torch", "orbax.checkpoint.StandardCheckpointer, 'save'", signal.SIGTERM),
    ("from_torch", "orbax.checkpoint.StandardCheckpointer, 'save'", signal.SIGINT),
    ("to_torch", "torch, 'save'", signal.SIGTERM)])
def test_signal_during_the_write_leaves_no_temporary(module, target, sig, tiny_checkpoint, tmp_path):
    d, _ = tiny_checkpoint
    source = d / "good.pth"
    if module == "to_torch":
        source = tmp_path / "model"
        assert cli(from_torch, d / "good.pth", "--out", source) == 0
    out = tmp_path / "out" / "converted"
    code = INTERRUPTED_WRITE.format(module=module, target=target, signal=sig.name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, str(source), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 128 + sig, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"interrupted by {sig.name}", proc.stderr[-3000:]
    assert os.listdir(out.parent) == [], os.listdir(out.parent)     # neither the output nor its temporary


def test_command_line_entry_point_and_no_torch_in_library(tiny_checkpoint, tmp_path):
    d, _ = tiny_checkpoint
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    bad = subprocess.run([sys.executable, "-m", "convert.from_torch", str(d / "truncated.pth"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert cli(from_torch, d / "good.pth", "--out", tmp_path / "good") == 0
    code = ("import sys; from rsd_jax import models; m, v = models.load_converted(sys.argv[1]); "
            "import jax.numpy as jnp; m.apply(v, jnp.zeros((1, 32, 32, 3))); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'library imported torch'")
    ok = subprocess.run([sys.executable, "-c", code, str(tmp_path / "good")], capture_output=True, text=True,
                        env=env)
    assert ok.returncode == 0, ok.stderr
