"""YAML and --set faults end in one ConfigError that names the file, key and line(s): one row a
case, so a new case is one line."""

import pytest

from moka_jax import config as C

# (config text, the message it must give)
FILE_CASES = [
    ("train:\n  lr: 1.0e-3\ntrain:\n  steps: 5\n",
     r"key 'train' appears twice in one mapping \(lines 1 and 3\)"),
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n",
     r"key 'lr' appears twice in one mapping \(lines 2 and 3\)"),
    ("model:\n  path: random\n  tiny:\n    hidden: 32\n    layers: 2\n    hidden: 64\n",
     r"key 'hidden' appears twice in one mapping \(lines 4 and 6\)"),
    ("adapter: {kind: lora, r: 4, r: 8}\n",
     r"key 'r' appears twice in one mapping \(lines 1 and 1\)"),
    ("train:\n  lr: [1, 2\n", r"bad\.yaml:3:1: invalid YAML: expected ',' or '\]', but got "
                              r"'<stream end>' \(while parsing a flow sequence at line 2\)"),
    ("train:\n\tlr: 1\n", r"bad\.yaml:2:1: invalid YAML: found character '\\t' that cannot "
                         r"start any token"),
]


@pytest.mark.parametrize("text,message", FILE_CASES, ids=[str(i) for i in range(len(FILE_CASES))])
def test_yaml_file_faults_name_the_file_and_lines(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError, match=message) as e:
        C.load_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)  # one line


def test_an_inherited_file_with_a_duplicate_key_is_named(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  cutoff_len: 64\n  cutoff_len: 128\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\n")
    with pytest.raises(C.ConfigError, match=r"base\.yaml: key 'cutoff_len' appears twice"):
        C.load_config(tmp_path / "child.yaml")


# (--set override, the message it must give)
SET_CASES = [
    ("train.lr=[1e-3", r"--set 'train.lr=\[1e-3': the value of 'train.lr' is not valid YAML"),
    ("adapter.shapes={a: 1, a: 2}", r"the value of 'adapter.shapes' is not valid YAML \(key 'a' "
                                    r"appears twice"),
    ("train.lr", r"--set 'train.lr': expected key=value"),
    ("train..lr=1", r"bad key 'train..lr'"),
]


@pytest.mark.parametrize("override,message", SET_CASES, ids=[c for c, _ in SET_CASES])
def test_set_faults_name_the_key(tmp_path, override, message):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  path: random\n  tokenizer: bytes\n")
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(path, [override])
