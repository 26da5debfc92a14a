"""Every private name rmexp touches (rmexp._compat) is still there; a moved one fails naming its library."""

from __future__ import annotations

import importlib.metadata

import pytest

from conftest import compose_cfg, tiny_overrides
from rmexp import _compat


def test_every_private_name_is_where_rmexp_expects_it():
    _compat.check()


def test_a_trainer_has_the_private_attributes_rmexp_writes(tmp_path):
    from reference_reader import load_data
    from rmexp.config import to_typed
    from rmexp.data import tokenize_pairs
    from rmexp.model import build_lora_config, load_reward_model
    from rmexp.prepare import for_training
    from rmexp.trainer import PairwiseRewardTrainer
    from rmexp.training_args import build_reward_config

    cfg = to_typed(compose_cfg(*tiny_overrides(tmp_path), "quantization=none", "data.max_pairs=16",
                               "trainer.eval_strategy=no"))
    train, _, _ = load_data(cfg.data)
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    model = for_training(model)  # the plain layers and padded batches: the trainer's defaults
    ds, _ = tokenize_pairs(tok, train, cfg.trainer.max_length)
    trainer = PairwiseRewardTrainer(model=model, args=build_reward_config(cfg.trainer, tmp_path, "none", model),
                                    train_dataset=ds, processing_class=tok, peft_config=build_lora_config(cfg.lora))
    _compat.check(trainer)
    _compat.log_metric(trainer, "train", "accuracy", 0.5)
    _compat.count_train_tokens(trainer, 7, "train")
    assert trainer._metrics["train"]["accuracy"] == [0.5] and trainer._metrics["train"]["num_tokens"] == [7]
    assert _compat.attn_implementation(trainer.model) == "sdpa"


def test_a_moved_name_fails_naming_the_library_and_its_version(monkeypatch):
    import bitsandbytes.functional

    monkeypatch.delattr(bitsandbytes.functional, "_convert_weight_packed_for_cpu_inverse")
    with pytest.raises(_compat.CompatError) as err:
        _compat.check()
    assert f"bitsandbytes {importlib.metadata.version('bitsandbytes')}" in str(err.value)
    assert "_convert_weight_packed_for_cpu_inverse" in str(err.value)


def private_name_uses(path, own_modules: set[str]) -> list[str]:
    """`file:line: use` for each private name of another library that the code of `path` reaches: an attribute
    `x._name` (not `self._`/`cls._`, not the file's own private helpers, not namedtuple's `_replace`, not rmexp's
    own private modules, `own_modules`) and an import of `_name` (but from rmexp's own modules)."""
    import io
    import re
    import tokenize

    source = path.read_text()
    own = {name for names in re.findall(r"^\s*(?:def|class)\s+(_\w+)|^\s*(_\w+)\s*[:=]", source, re.M)
           for name in names if name}
    statements, tokens = [], []  # the code of each logical line, strings and comments left out
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type in (tokenize.NAME, tokenize.OP):
            tokens.append(t)
        elif t.type == tokenize.NEWLINE and tokens:
            statements.append(tokens)
            tokens = []
    found = []
    for tokens in statements:
        words = [t.string for t in tokens]
        for i in range(1, len(tokens) - 1):
            obj, name = words[i - 1], words[i + 1]
            if words[i] != "." or not re.match(r"_[a-z]", name):
                continue
            if obj in ("self", "cls") or obj in own or name in own or name == "_replace":
                continue
            if obj == "rmexp" and name in own_modules:
                continue
            found.append(f"{path.name}:{tokens[i + 1].start[0]}: {obj}.{name}")
        if "import" in words and words[0] in ("from", "import"):
            module = "".join(words[1:words.index("import")]) if words[0] == "from" else ""
            if module.startswith("rmexp"):
                continue
            found += [f"{path.name}:{t.start[0]}: import {t.string}" for t in tokens[words.index("import") + 1:]
                      if re.match(r"_[a-z]", t.string)]
    return found


def test_no_module_but_compat_reaches_a_private_name():
    from conftest import ROOT

    paths = sorted((ROOT / "src/rmexp").glob("*.py"))
    own_modules = {path.stem for path in paths if path.stem.startswith("_")}
    found = [use for path in paths if path.name != "_compat.py" for use in private_name_uses(path, own_modules)]
    assert not found, "private names of other libraries belong in rmexp._compat:\n" + "\n".join(found)


def test_the_private_name_check_sees_attributes_and_imports(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("from torch import (nn,\n    _utils)\nimport _thread\nfrom rmexp._compat import check\n\n\n"
                    "def _own():\n    pass  # a comment on x._private\n\n\nclass A:\n    def f(self, trainer, t):\n"
                    "        self._x = _own, '._private'\n        t._replace(a=1)\n"
                    "        return trainer._metrics, A._own, rmexp._compat\n")
    assert private_name_uses(path, {"_compat"}) == ["module.py:2: import _utils", "module.py:3: import _thread",
                                                    "module.py:15: trainer._metrics"]
