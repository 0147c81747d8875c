"""Config tree: YAML <-> dataclasses <-> dict, overrides, inherit, and every error message."""

from pathlib import Path

import pytest
import yaml
from flax import nnx

from moka_jax import config as C, nn
from moka_jax.adapters import DoRAConfig, LoRAConfig, MoKAConfig, MoKAsConfig

REPO = Path(__file__).resolve().parents[2]
# Run configs; configs/experiments/sweep.yaml is the sweep's protocol, not a run config.
CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml"))
           + sorted((REPO / "configs").glob("*/*.yaml"))
           if p.name not in ("sweep.yaml", "protocol.yaml")]  # bench protocols, not runs
TRAIN_FILE = "data/commonsense_train/boolq/train.json"


def write(path: Path, d) -> Path:
    path.write_text(d if isinstance(d, str) else yaml.safe_dump(d))
    return path


def minimal(**sections):
    d = {"model": {"path": "random", "tokenizer": "bytes"}, "data": {"train": [TRAIN_FILE]}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


def error(fn, *args, **kw) -> str:
    with pytest.raises(C.ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_configs_round_trip(path, tmp_path):
    cfg = C.load_config(path)
    runs = "runs/" if path.parent.name == "configs" else f"runs/{path.parent.name}/"
    assert cfg.name == path.stem and cfg.train.out_dir.format(name=cfg.name) == runs + path.stem
    d = cfg.to_dict()
    assert C.config_from_dict(d) == cfg
    assert C.config_from_dict(d).to_dict() == d
    dumped = write(tmp_path / "dump.yaml", C.dump_config(cfg))
    assert C.load_config(dumped) == cfg


# Configs whose model.path is a checkpoint the user downloads (README: Supported architectures).
PAPER_CONFIGS = ("llama2-7b-commonsense-moka", "llama3-8b-commonsense-moka",
                 "qwen2.5-0.5b-commonsense-moka", "qwen2.5-0.5b-commonsense-lora",
                 "qwen3-0.6b-commonsense-moka", "qwen3-0.6b-commonsense-lora")


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem not in PAPER_CONFIGS],
                         ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    C.validate(C.load_config(path), num_devices=1)


def test_paper_configs_are_paper_settings():
    for name in PAPER_CONFIGS:
        cfg = C.load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model.quant == "nf4" and cfg.adapter.targets == r"(q_proj|v_proj)$"
        assert cfg.train.lr == 2e-4 and cfg.train.batch_size == 32 and cfg.data.cutoff_len == 256
        kind = MoKAConfig if name.endswith("moka") else LoRAConfig
        assert isinstance(cfg.adapter.config, kind), name
        assert "model.path" in error(C.validate, cfg)  # no checkpoint here


def test_adapter_kinds_of_shipped_configs():
    kinds = {p.stem: C.load_config(p).adapter.config for p in CONFIGS}
    assert kinds["smollm2-135m-commonsense-lora"] == LoRAConfig(r=16, alpha=32.0)
    assert kinds["smollm2-135m-commonsense-dora"] == DoRAConfig(r=8, alpha=16.0)
    assert isinstance(kinds["smollm2-135m-commonsense-mokas"], MoKAsConfig)
    assert kinds["smollm2-135m-commonsense-moka-ungated"] == MoKAConfig(gated=False)


def test_defaults_and_flat_adapter_dict():
    cfg = C.config_from_dict(minimal())
    assert cfg.adapter.kind == "moka" and cfg.adapter.targets == r"(q_proj|v_proj)$"
    d = cfg.to_dict()
    assert d["adapter"]["kind"] == "moka" and "r" in d["adapter"] and "config" not in d["adapter"]
    assert d["data"]["train"] == [{"path": TRAIN_FILE, "weight": None, "limit": None}]
    assert C.config_from_dict(minimal(adapter={"kind": "mokas", "primes": [3, 5]})).adapter.config \
        == MoKAsConfig(primes=(3, 5))
    shapes = [[[8, 8], [8, 8]], [[2, 32], [32, 2]]]
    cfg = C.config_from_dict(minimal(adapter={"shapes": shapes}))
    assert cfg.adapter.config.shapes == (((8, 8), (8, 8)), ((2, 32), (32, 2)))
    assert cfg.to_dict()["adapter"]["shapes"] == shapes and C.config_from_dict(cfg.to_dict()) == cfg


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    p = write(tmp_path / "c.yaml", f"model: {{path: random, tokenizer: bytes}}\n"
                                    f"data: {{train: [{TRAIN_FILE}]}}\ntrain: {{lr: 1e-4}}\n")
    assert C.load_config(p).train.lr == 1e-4
    assert C.parse_value("3e-5") == 3e-5 and C.parse_value("[64, 128]") == [64, 128]
    assert C.parse_value("null") is None and C.parse_value("true") is True


# ----------------------------------------------------------------------------- overrides


def test_overrides(tmp_path):
    p = write(tmp_path / "c.yaml", minimal())
    cfg = C.load_config(p, ["train.lr=1e-4", "adapter.r=8", "model.tiny.hidden=32",
                            "data.buckets=[64, 128, 256, 512]", "data.cutoff_len=512",
                            "data.train.0.limit=5", "mesh.distributed.process_id=0", "name=x"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.config.r == 8 and cfg.model.tiny.hidden == 32
    assert cfg.data.buckets == [64, 128, 256, 512] and cfg.data.cutoff_len == 512
    assert cfg.data.train[0] == C.DataFile(TRAIN_FILE, limit=5)
    assert cfg.mesh.distributed.process_id == 0 and cfg.name == "x" and cfg.train.out_dir == "runs/x"


def test_override_adapter_kind_drops_other_kind_options(tmp_path):
    p = write(tmp_path / "c.yaml", minimal(adapter={"kind": "moka", "r": 6, "targets": "o_proj$"}))
    cfg = C.load_config(p, ["adapter.kind=lora", "adapter.alpha=8"])
    assert cfg.adapter.config == LoRAConfig(alpha=8.0) and cfg.adapter.targets == "o_proj$"


def test_add_config_args():
    import argparse

    args = C.add_config_args(argparse.ArgumentParser()).parse_args(
        ["c.yaml", "--set", "train.lr=1e-4", "--set", "adapter.r=8"])
    assert args.config == "c.yaml" and args.overrides == ["train.lr=1e-4", "adapter.r=8"]


# ----------------------------------------------------------------------------- inherit


def test_inherit_merges_and_replaces(tmp_path):
    write(tmp_path / "base.yaml", minimal(train={"lr": 3e-4, "steps": 50, "warmup_steps": 5},
                                          data={"buckets": [64, 128, 256]},
                                          adapter={"kind": "moka", "r": 6, "targets": "q_proj$"}))
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml",
                  {"inherit": "../base.yaml", "train": {"steps": 70}, "data": {"buckets": [256]}})
    cfg = C.load_config(child)
    assert cfg.train.steps == 70 and cfg.train.lr == 3e-4        # mapping merged key by key
    assert cfg.data.buckets == [256]                              # list replaced
    assert cfg.adapter.config == MoKAConfig(r=6) and cfg.name == "child"
    grandchild = write(tmp_path / "g.yaml", {"inherit": "sub/child.yaml",
                                             "adapter": {"kind": "dora"}})
    cfg = C.load_config(grandchild)
    assert cfg.adapter.config == DoRAConfig() and cfg.adapter.targets == "q_proj$"


def test_inherit_errors(tmp_path):
    a = write(tmp_path / "a.yaml", {"inherit": "b.yaml"})
    write(tmp_path / "b.yaml", {"inherit": "a.yaml"})
    assert "inherit cycle" in error(C.load_config, a)
    c = write(tmp_path / "c.yaml", {"inherit": "nope.yaml"})
    msg = error(C.load_config, c)
    assert "nope.yaml" in msg and "not found" in msg


# ----------------------------------------------------------------------------- errors


def test_unknown_key_did_you_mean_names_key_and_file(tmp_path):
    write(tmp_path / "base.yaml", minimal())
    child = write(tmp_path / "child.yaml", {"inherit": "base.yaml", "train": {"lrr": 1e-4}})
    msg = error(C.load_config, child)
    assert "unknown key 'train.lrr'" in msg and "did you mean 'train.lr'?" in msg
    assert str(child.resolve()) in msg and "base.yaml" not in msg


def test_unknown_key_in_the_wrong_section(tmp_path):
    p = write(tmp_path / "c.yaml", minimal(train={"cutoff_len": 128}))
    msg = error(C.load_config, p)
    assert "'train.cutoff_len'" in msg and "did you mean 'data.cutoff_len'?" in msg
    # A typo in the wrong section: judged on the name, not on the shared 'train.' prefix.
    msg = error(C.load_config, write(tmp_path / "d.yaml", minimal(train={"cutof_len": 128})))
    assert "did you mean 'data.cutoff_len'?" in msg


def test_unknown_section_and_override_key(tmp_path):
    p = write(tmp_path / "c.yaml", minimal())
    assert "did you mean 'model'?" in error(C.config_from_dict, {**minimal(), "modle": {}})
    msg = error(C.load_config, p, ["train.warmup=10"])
    assert "'train.warmup'" in msg and "did you mean 'train.warmup_steps'?" in msg
    assert "--set train.warmup=10" in msg
    assert "expected key=value" in error(C.load_config, p, ["train.lr"])
    msg = error(C.load_config, p, ["data.train.0.wieght=2"])
    assert msg.startswith("--set data.train.0.wieght=2: unknown key 'data.train[0].wieght'")
    assert "did you mean 'data.train[0].weight'?" in msg


def test_adapter_errors():
    msg = error(C.config_from_dict, minimal(adapter={"kind": "moka", "alpha": 16}))
    assert "'adapter.alpha'" in msg and "'lora'" in msg and "moka" in msg
    msg = error(C.config_from_dict, minimal(adapter={"kind": "moka", "scal": 2.0}))
    assert "did you mean 'adapter.scale'?" in msg
    assert "did you mean 'lora'?" in error(C.config_from_dict, minimal(adapter={"kind": "lorra"}))
    msg = error(C.config_from_dict, minimal(adapter={"r": "ten"}))
    assert "adapter.r = 'ten' (str), expected int" in msg
    msg = error(C.config_from_dict, minimal(adapter={"schedule": "fast"}))
    assert "adapter.schedule = 'fast', expected one of ['auto', 'chunked', 'batched']" in msg


def test_adapter_schedule_reaches_the_layers():
    cfg = C.config_from_dict(minimal(adapter={"kind": "moka", "schedule": "batched", "r": 2}))
    assert cfg.adapter.config.schedule == "batched" and cfg.to_dict()["adapter"]["schedule"] == "batched"
    assert C.config_from_dict(minimal()).adapter.config.schedule == "auto"
    base = nn.Linear(8, 8, rngs=nnx.Rngs(0))  # r=2: the default r=10 outweighs an 8x8 layer
    assert cfg.adapter.config.build(base, "q_proj", nnx.Rngs(1)).schedule == "batched"


def test_wrong_type_names_key_value_and_type(tmp_path):
    p = write(tmp_path / "c.yaml", minimal(train={"batch_size": "32"}))
    msg = error(C.load_config, p)
    assert "train.batch_size = '32' (str), expected int" in msg and str(p) in msg
    assert "expected bool" in error(C.config_from_dict, minimal(data={"train_on_inputs": "no"}))
    assert "expected int" in error(C.config_from_dict, minimal(train={"steps": True}))
    msg = error(C.config_from_dict, minimal(train={"grad_clip": "x"}))
    assert "expected float or null" in msg
    assert "expected one of ['nf4', 'int4', 'none']" in error(
        C.config_from_dict, minimal(model={"quant": "nf8"}))
    assert "data.train[0].limit = 'all'" in error(
        C.config_from_dict, minimal(data={"train": [{"path": TRAIN_FILE, "limit": "all"}]}))


def test_batch_not_divisible_by_data_axis():
    # Checked once the device count is known (validate), after the mesh fits the devices.
    cfg = C.config_from_dict(minimal(train={"batch_size": 30}, mesh={"data": 4}))
    msg = error(C.validate, cfg, num_devices=4)
    assert "train.batch_size = 30" in msg and "data x fsdp" in msg and "(4 devices)" in msg
    # Sharded over both axes: 12 fits data = 4 alone but not 4 x 2 (found by a README review).
    cfg = C.config_from_dict(minimal(train={"batch_size": 12}, mesh={"data": 4, "fsdp": 2}))
    assert "(8 devices)" in error(C.validate, cfg, num_devices=8)
    msg = error(C.validate, C.config_from_dict(minimal(train={"batch_size": 12},
                                                       mesh={"fsdp": 2})), num_devices=8)
    assert "(8 devices)" in msg
    cfg = C.config_from_dict(minimal(train={"batch_size": 30}))  # data = -1: known at validate
    msg = error(C.validate, cfg, num_devices=4)
    assert "train.batch_size = 30" in msg and "(4 devices)" in msg
    C.validate(cfg, num_devices=2)
    assert "grad_accum" in error(C.config_from_dict, minimal(train={"batch_size": 30, "grad_accum": 4}))


def test_mesh_larger_than_the_devices_blames_the_devices():
    # mesh.data = 3 with batch 8 on one device: the device count is the problem, not the batch.
    cfg = C.config_from_dict(minimal(train={"batch_size": 8}, mesh={"data": 3}))
    msg = error(C.validate, cfg, num_devices=1)
    assert "3 devices, but 1 are available" in msg and "batch" not in msg
    assert "mesh.data=-1" in msg


def test_mesh_resolution():
    assert C.resolve_mesh(C.MeshConfig(data=-1, fsdp=2), 8) == (4, 2)
    assert C.resolve_mesh(C.MeshConfig(data=2, fsdp=-1), 8) == (2, 4)
    assert "8 are available" in error(C.resolve_mesh, C.MeshConfig(data=2, fsdp=2), 8)
    assert "do not divide" in error(C.resolve_mesh, C.MeshConfig(data=-1, fsdp=3), 8)
    assert "both be -1" in error(C.config_from_dict, minimal(mesh={"data": -1, "fsdp": -1}))


def test_cutoff_larger_than_largest_bucket():
    msg = error(C.config_from_dict, minimal(data={"cutoff_len": 512, "buckets": [64, 128, 256]}))
    assert "data.cutoff_len = 512 is larger than the largest bucket 256" in msg
    assert "strictly increasing" in error(C.config_from_dict, minimal(data={"buckets": [128, 64]}))


def test_missing_train_file_names_path(tmp_path):
    d = minimal(data={"train": [TRAIN_FILE, "data/nope/train.json"]})
    msg = error(C.validate, C.config_from_dict(d))
    assert "data.train[1].path" in msg and "data/nope/train.json" in msg and "not found" in msg
    p = write(tmp_path / "c.yaml", d)
    msg = error(C.load_config, p)  # load_config checks data files too
    assert str(p) in msg and "data.train[1].path" in msg and "data/nope/train.json" in msg
    msg = error(C.load_config, write(tmp_path / "c.yaml", minimal()), ["data.val=[x.json]"])
    assert "--set data.val=[x.json]" in msg and "data.val[0].path" in msg and "'x.json'" in msg


def test_invalid_regex():
    msg = error(C.config_from_dict, minimal(adapter={"targets": "(q_proj|v_proj$"}))
    assert "adapter.targets" in msg and "not a valid regex" in msg


def test_targets_as_a_list_of_module_names(tmp_path):
    p = write(tmp_path / "c.yaml", minimal(adapter={"kind": "lora", "targets": ["q_proj", "v_proj"]}))
    cfg = C.load_config(p)
    assert cfg.adapter.targets == ["q_proj", "v_proj"]
    assert C.load_config(p, ["adapter.targets=[o_proj]"]).adapter.targets == ["o_proj"]
    assert C.config_from_dict(cfg.to_dict()) == cfg
    msg = error(C.config_from_dict, minimal(adapter={"targets": ["self_attn.q_proj"]}))
    assert "adapter.targets" in msg and "['q_proj']" in msg
    msg = error(C.config_from_dict, minimal(adapter={"targets": [3]}))
    assert "adapter.targets" in msg and "str or list of str" in msg


def test_other_structural_errors():
    assert "model.tokenizer" in error(C.config_from_dict, {"model": {"path": "random"},
                                                            "data": {"train": [TRAIN_FILE]}})
    assert "data.train lists no files" in error(C.config_from_dict, {})
    assert "every file a weight" in error(C.config_from_dict, minimal(
        data={"train": [{"path": TRAIN_FILE, "weight": 1.0}, TRAIN_FILE]}))
    assert "warmup_steps" in error(C.config_from_dict, minimal(train={"steps": 10, "warmup_steps": 20}))
    assert "kv_heads" in error(C.config_from_dict, minimal(model={"tiny": {"heads": 4, "kv_heads": 3}}))
    assert "must be a mapping" in error(C.config_from_dict, {"train": 3})
    assert issubclass(C.ConfigError, ValueError)
