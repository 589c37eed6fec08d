"""The registry of row kinds and probe families: held-out families share nothing with any training row kind, and
no default training mix reaches them."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ctxstretch.data import families, heldout
from ctxstretch.data.families import EVAL_FAMILIES, HELD_OUT, TRAINING_KINDS, ngrams, shared_ngrams
from ctxstretch.data.mix import ROW_KINDS, RowMixer
from ctxstretch.data.probes import rng_for
from ctxstretch.data.ruler import PROBE_KINDS
from ctxstretch.data.sources import embedded_token_stream
from ctxstretch.recipes import PRESETS, expand, read_spec, recipe_params
from ctxstretch.recipes.extend import DEFAULT_MIX, PRETRAINED_MIX


def test_every_training_row_kind_is_registered():
    assert set(ROW_KINDS) <= set(TRAINING_KINDS)
    assert set(PROBE_KINDS) <= set(TRAINING_KINDS)


def test_the_new_families_are_held_out_and_in_format_ones_are_not():
    assert set(heldout.FAMILIES) <= set(HELD_OUT)
    assert "passkey" not in HELD_OUT and "needle" not in HELD_OUT
    assert "template" in families.overlap("passkey")["passkey"]


@pytest.mark.parametrize("family", HELD_OUT)
def test_a_held_out_family_shares_no_template_filler_or_task(family):
    f = EVAL_FAMILIES[family]
    assert f.templates, "a held-out family declares its template strings"
    for kind, k in TRAINING_KINDS.items():
        assert not shared_ngrams(k, f), f"{family} shares a template with {kind}"
        assert k.filler != f.filler and k.task != f.task, (family, kind)


def test_the_template_check_catches_a_shared_phrase():
    a = families.Family("t1", "f1", ("\nThe magic number for {word} is {key}.\n",))
    b = families.Family("t2", "f2", ("Tell me the magic number for {x} please",))
    assert shared_ngrams(a, b) == {("the", "magic", "number", "for")}
    assert ngrams("{a} one two three four {b}") == {("one", "two", "three", "four")}


def _default_mixes() -> list[tuple[str, dict[str, float]]]:
    mixes = [("extend", DEFAULT_MIX), ("extend (pretrained model)", PRETRAINED_MIX)]
    for preset in sorted(PRESETS.glob("*.yaml")):
        data, where = read_spec(preset.stem)
        pipe = expand(recipe_params(data, where), 256)
        mixes += [(f"{preset.stem}/{s.name}", s.data.mix) for s in pipe.stages if getattr(s, "data", None)]
    return mixes


def test_no_default_mix_contains_a_row_kind_sharing_with_a_held_out_family():
    for where, mix in _default_mixes():
        for kind in (k for k, w in mix.items() if w > 0):
            assert kind in TRAINING_KINDS, f"{where}: row kind {kind} is not in the registry"
            for family in HELD_OUT:
                assert kind not in families.overlap(family), (where, kind, family)


def test_training_rows_never_contain_a_held_out_template(tokenizer):
    """Generated rows of every row kind, decoded: none holds a four-word run of a held-out family's templates."""
    held = set().union(*(ngrams(t) for f in HELD_OUT for t in EVAL_FAMILIES[f].templates))
    stream = embedded_token_stream(tokenizer, "train")
    for kind in ("text", "cip", "text_copy", "passkey", "needle", "synl"):
        mixer = RowMixer(tokenizer, stream, name="t", seed=0, length=512, batch=4, mix={kind: 1.0})
        for i in range(3):
            for row in mixer(i)["input_ids"]:
                words = re.findall(r"[a-z0-9']+", tokenizer.decode(row.tolist()).lower())
                grams = {tuple(words[j : j + 4]) for j in range(len(words) - 3)}
                assert not grams & held, (kind, grams & held)


def test_wilson_interval():
    from ctxstretch.eval.heldout import wilson

    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    assert np.diff(wilson(30, 60))[0] < np.diff(wilson(3, 6))[0]  # more probes, narrower interval


def test_ratio_interval_by_the_delta_method():
    from ctxstretch.eval.heldout import ratio_interval

    lo, hi = ratio_interval((0.46, 0.08, 36), (0.65, 0.06, 36))  # the default extend's 8x over its in-window score
    r = 0.46 / 0.65
    assert lo < r < hi and (hi - lo) / 2 == pytest.approx(r * np.hypot(0.08 / 0.46, 0.06 / 0.65))
    assert ratio_interval((0.5, 0.0, 10), (0.5, 0.0, 10)) == (1.0, 1.0)  # no spread, no interval
    assert ratio_interval((0.5, 0.1, 10), (0.0, 0.0, 10)) == (0.0, float("inf"))
    assert ratio_interval((0.0, 0.1, 10), (0.5, 0.1, 10)) == (0.0, pytest.approx(0.2))  # a zero score still has spread


def test_held_out_probes_come_from_evaluation_seeds_only():
    # the evaluation's purposes are drawn above the training range; the same purpose in training gives other probes
    assert not np.array_equal(rng_for("heldout-kv_uuid-256-0.5", 0, True).integers(0, 1 << 30, 4),
                              rng_for("heldout-kv_uuid-256-0.5", 0, False).integers(0, 1 << 30, 4))
