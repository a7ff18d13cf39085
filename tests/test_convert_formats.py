"""Weight formats both ways: safetensors files and timm hub folders read into the same Flax variables as the .pth,
exports that timm itself loads with the source model's logits, bad safetensors input refused, and the safetensors
and hub-folder export (and import) without torch."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

from convert import formats, from_torch, to_torch, verify
from rsd_jax import model_dir, models
from test_convert import TINY, assert_identical, cli, random_timm

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """get(name) -> (timm model, its folder, (Flax model, variables) converted from its .pth), built once per model:
    a CNN with BatchNorm and a tiny ViT whose head count the weights do not show."""
    cache = {}

    def get(name):
        if name not in cache:
            overrides, timm_kwargs = TINY[name]
            d = tmp_path_factory.mktemp(name)
            tm = random_timm(name, 20, NUM_CLASSES, **timm_kwargs)
            torch.save(tm.state_dict(), d / "model.pth")
            assert cli(from_torch, d / "model.pth", "--out", d / "flax", *model_flags(name)) == 0
            cache[name] = tm, d, models.load_model(d / "flax")
        return cache[name]
    return get


def model_flags(name):
    return ["--model", name, *[f"--override={k}={v!r}" for k, v in TINY[name][0].items()]]


def logits(model, name, seed=0):
    size = TINY[name][0]["img_size"]
    x = torch.from_numpy(np.random.RandomState(seed).randn(2, 3, size, size).astype(np.float32))
    with torch.no_grad():
        return model.eval()(x)


def timm_from_file(name, path):
    """The loading recipe for a weights file: timm's own pretrained loader pointed at it."""
    return timm.create_model(name, pretrained=True, num_classes=NUM_CLASSES, **TINY[name][1],
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))


def assert_same_model(directory, converted_pth, **options):
    """The model directory holds the model converted from the .pth (all its options, also those no weight shows,
    but `options`) and the same variables."""
    model, variables = models.load_model(directory)
    assert model == converted_pth[0].clone(**options)
    assert_identical(variables, converted_pth[1])


def assert_same_logits(model, tm, name):
    # The weights are the source's bit for bit (transposes only), so the logits are too.
    torch.testing.assert_close(logits(model, name), logits(tm, name), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch16_224"])
def test_exports_load_in_timm_and_read_back(name, converted, capsys):
    tm, d, flax = converted(name)
    assert cli(to_torch, d / "flax", "--out", d / "out.safetensors", "--format", "safetensors") == 0
    assert cli(to_torch, d / "flax", "--out", d / "hub", "--format", "hf") == 0
    assert "local-dir:" in capsys.readouterr().out
    assert_same_logits(timm_from_file(name, d / "out.safetensors"), tm, name)
    # The hub folder: timm builds the architecture from config.json alone, and reads its weights file as any file.
    assert_same_logits(timm.create_model(f"local-dir:{d / 'hub'}", pretrained=True), tm, name)
    assert_same_logits(timm_from_file(name, d / "hub" / formats.SAFETENSORS_NAME), tm, name)
    config = json.loads((d / "hub" / formats.HUB_CONFIG).read_text())
    assert (config["architecture"], config["num_classes"], config["pretrained_cfg"]["num_classes"]) \
        == (name, NUM_CLASSES, NUM_CLASSES)
    assert config["num_features"] == tm.num_features

    # Read back: the safetensors file as the .pth (same flags), the hub folder with none (config.json says it all).
    assert cli(from_torch, d / "out.safetensors", "--out", d / "from_st", *model_flags(name)) == 0
    assert cli(from_torch, d / "hub", "--out", d / "from_hub") == 0
    assert "model from config.json" in capsys.readouterr().out
    for out in ("from_st", "from_hub"):
        assert_same_model(d / out, flax)
    assert model_dir.read_model_metadata(d / "from_hub")["source_format"] == "hub"


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch16_224"])
def test_files_written_by_timm_convert_as_the_pth(name, converted, tmp_path, capsys):
    tm, _, flax = converted(name)
    save_for_hf(tm, tmp_path / "hub_st", safe_serialization=True)     # config.json + model.safetensors
    save_for_hf(tm, tmp_path / "hub_bin", safe_serialization=False)   # config.json + pytorch_model.bin
    safetensors.torch.save_file(tm.state_dict(), tmp_path / "weights.safetensors")
    # timm records the input size it was told (a ViT's) or its default (224 for a ResNet, which has no img_size).
    timm_size = json.loads((tmp_path / "hub_st" / formats.HUB_CONFIG).read_text())["pretrained_cfg"]["input_size"]
    for hub in ("hub_st", "hub_bin"):
        assert cli(from_torch, tmp_path / hub, "--out", tmp_path / f"{hub}_flax") == 0
        out = capsys.readouterr().out
        assert f"model from config.json: {name}, {NUM_CLASSES} classes" in out and "is a guess" not in out
        assert_same_model(tmp_path / f"{hub}_flax", flax, img_size=timm_size[-1])
    # Exported again as a hub folder, it keeps timm's preprocessing facts (mean/std, crop) and loads in timm.
    assert cli(to_torch, tmp_path / "hub_st_flax", "--out", tmp_path / "hub_again", "--format", "hf") == 0
    written, again = (json.loads((tmp_path / h / formats.HUB_CONFIG).read_text())["pretrained_cfg"]
                      for h in ("hub_st", "hub_again"))
    assert {k: again[k] for k in ("mean", "std", "crop_pct", "interpolation", "input_size")} \
        == {k: written[k] for k in ("mean", "std", "crop_pct", "interpolation", "input_size")}
    assert_same_logits(timm.create_model(f"local-dir:{tmp_path / 'hub_again'}", pretrained=True), tm, name)
    assert cli(from_torch, tmp_path / "weights.safetensors", "--out", tmp_path / "st_flax", *model_flags(name)) == 0
    assert_same_model(tmp_path / "st_flax", flax)


def test_half_precision_reads_as_from_a_torch_file(converted, tmp_path):
    """bfloat16 (which numpy lacks) and float16 widen to float32 exactly as torch's .float() does."""
    tm, _, _ = converted("resnet18")
    half = {k: (v.bfloat16() if "bn" in k else v.half()) if v.is_floating_point() else v
            for k, v in tm.state_dict().items()}
    safetensors.torch.save_file(half, tmp_path / "half.safetensors")
    torch.save(half, tmp_path / "half.pth")
    for f in ("half.safetensors", "half.pth"):
        assert cli(from_torch, tmp_path / f, "--out", tmp_path / f"{f}_flax", *model_flags("resnet18")) == 0
    assert_identical(models.load_model(tmp_path / "half.safetensors_flax")[1],
                     models.load_model(tmp_path / "half.pth_flax")[1])


def bad_sources(d, sd):
    """(source, extra flags, expected message) for safetensors files and hub folders that must be refused."""
    def save(name, tensors):
        safetensors.numpy.save_file(tensors, d / name)
    save("missing_key.safetensors", {k: v for k, v in sd.items() if k != "fc.bias"})
    save("wrong_shape.safetensors", dict(sd, **{"layer1.0.bn1.bias": np.zeros(15, np.float32)}))
    save("wrong_dtype.safetensors", dict(sd, **{"layer1.0.bn1.weight": np.ones(16, np.int32)}))
    save("good.safetensors", sd)
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (d / "truncated.safetensors").write_bytes((d / "good.safetensors").read_bytes()[:3000])

    def hub(name, config, weights=True):
        (d / name).mkdir()
        if config is not None:
            (d / name / formats.HUB_CONFIG).write_text(json.dumps(config))
        if weights:
            save(f"{name}/{formats.SAFETENSORS_NAME}", sd)
    hub("hub_no_architecture", {"num_classes": NUM_CLASSES})
    hub("hub_unknown_architecture", {"architecture": "resnet18d", "num_classes": NUM_CLASSES})
    hub("hub_other_family", {"architecture": "vit_small_patch16_224", "num_classes": NUM_CLASSES})
    hub("hub_wrong_classes", {"architecture": "resnet18", "num_classes": 100})
    hub("hub_no_weights", {"architecture": "resnet18", "num_classes": NUM_CLASSES}, weights=False)
    hub("not_a_hub", None)
    return [
        ("missing_key.safetensors", [], "missing in checkpoint: fc.bias"),
        ("wrong_shape.safetensors", [], "shape mismatch (checkpoint vs model): layer1.0.bn1.bias (15,) vs (16,)"),
        ("wrong_dtype.safetensors", [], "dtype mismatch (checkpoint vs model): layer1.0.bn1.weight int32 vs float32"),
        ("garbage.safetensors", [], "not a readable safetensors file"),
        ("truncated.safetensors", [], "not a readable safetensors file"),
        ("good.safetensors", ["--use_ema"], "no 'state_dict_ema'"),
        ("hub_no_architecture", [], "no 'architecture'"),
        ("hub_unknown_architecture", [], "architecture 'resnet18d', which rsd_jax does not have"),
        ("hub_other_family", [], "names vit_small_patch16_224 but the weights are a resnet18"),
        ("hub_wrong_classes", [], "has 10 classes"),
        ("hub_no_weights", [], "a hub folder without weights"),
        ("not_a_hub", [], "not a timm hub folder (no config.json)"),
    ]


def test_bad_safetensors_and_hub_folders_are_one_line_and_exit_2(converted, tmp_path, capsys):
    tm, _, _ = converted("resnet18")
    for source, flags, message in bad_sources(tmp_path, {k: v.numpy() for k, v in tm.state_dict().items()}):
        assert cli(from_torch, tmp_path / source, "--out", tmp_path / "out", *flags) == 2, source
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, (source, err)
        assert not [p for p in os.listdir(tmp_path) if p.startswith("out")], source   # no output, no temporary


# Runs the commands with torch and timm unimportable: a finder ahead of all others refuses them.
WITHOUT_TORCH = """
import json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, NoTorch())
from convert import from_torch, to_torch
model, pth, out = sys.argv[1:]
codes = [to_torch.main([model, "--out", out + "/model.safetensors", "--format", "safetensors"]),
         to_torch.main([model, "--out", out + "/hub", "--format", "hf"]),
         from_torch.main([out + "/hub", "--out", out + "/back"]),
         to_torch.main([model, "--out", out + "/model.pth"]),
         from_torch.main([pth, "--out", out + "/from_pth"])]
print(json.dumps(dict(codes=codes, loaded=sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "timm"}))))
"""


def test_safetensors_and_hub_export_need_no_torch(converted, tmp_path):
    name = "vit_small_patch16_224"
    tm, d, flax = converted(name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(d / "flax"), str(d / "model.pth"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == dict(codes=[0, 0, 0, 2, 2], loaded=[]), (result, proc.stderr[-3000:])
    assert "the load was not checked" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --format pth needs torch (pip install -e '.[convert]'); --format safetensors and hf "
                      "do not", f"error: {d / 'model.pth'} is a torch.save file: reading it needs torch (pip install "
                      "-e '.[convert]'); safetensors files and hub folders with model.safetensors do not"], errors
    assert "Traceback" not in proc.stderr and sorted(os.listdir(tmp_path)) == ["back", "hub", "model.safetensors"]
    # What was written there loads in timm here, and the hub folder read back there is the source.
    assert_same_logits(timm_from_file(name, tmp_path / "model.safetensors"), tm, name)
    assert_same_logits(timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True), tm, name)
    assert_same_model(tmp_path / "back", flax)


def test_hub_folder_of_a_model_timm_cannot_name_is_refused(tmp_path, capsys):
    """The reference's Swin-pico student has no timm entry point: its safetensors file loads into the timm model
    convert.verify builds, but a hub folder timm could not build from config.json is refused, nothing written."""
    name = "swin_pico_patch4_window7_224"
    overrides = models.model_spec(name).smoke
    variables = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype),
                                       models.init_shapes(models.create_model(name, NUM_CLASSES, **overrides)))
    models.save_model(tmp_path / "pico", name, NUM_CLASSES, variables, overrides=overrides)
    assert cli(to_torch, tmp_path / "pico", "--out", tmp_path / "hub", "--format", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: timm cannot build {name}") and "\n" not in err, err
    assert os.listdir(tmp_path) == ["pico"]
    assert cli(to_torch, tmp_path / "pico", "--out", tmp_path / "pico.safetensors", "--format", "safetensors") == 0
    verify.load_strict(verify.create_timm(name, NUM_CLASSES, overrides),
                       safetensors.numpy.load_file(tmp_path / "pico.safetensors"), "the exported file")
