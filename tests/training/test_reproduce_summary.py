"""The reproduction's aggregation: means/stds over seeds, per set, and the claim verdicts."""

from __future__ import annotations

import pytest

from training.reproduce import claims, summarize

KEYS = ("auroc", "tnr_at_tpr95", "dtacc", "aupr_in", "aupr_out")


def run(head, seed, acc, aurocs: dict[str, dict[str, float]]):
    return {
        "head": head, "seed": seed, "accuracy": {"test": acc},
        "ood": {s: {score: dict.fromkeys(KEYS, v) for score, v in per.items()} for s, per in aurocs.items()},
    }  # fmt: skip


RUNS = [
    run(
        "softmax",
        0,
        0.90,
        {
            "a": {"es": 0.80, "mps": 0.8, "energy": 0.9, "max_logit": 0.9},
            "b": {"es": 0.70, "mps": 0.7, "energy": 0.7, "max_logit": 0.7},
        },
    ),
    run(
        "softmax",
        1,
        0.92,
        {
            "a": {"es": 0.84, "mps": 0.8, "energy": 0.9, "max_logit": 0.9},
            "b": {"es": 0.74, "mps": 0.7, "energy": 0.7, "max_logit": 0.7},
        },
    ),
    run(
        "isomaxplus",
        0,
        0.91,
        {"a": {"mds": 0.95, "es": 0.9, "mps": 0.9}, "b": {"mds": 0.60, "es": 0.9, "mps": 0.9}},
    ),
    run(
        "isomaxplus",
        1,
        0.91,
        {"a": {"mds": 0.97, "es": 0.9, "mps": 0.9}, "b": {"mds": 0.62, "es": 0.9, "mps": 0.9}},
    ),
]


def test_summary_means_and_sample_stds():
    s = summarize(RUNS)
    es = s["softmax_es"]
    assert es["seeds"] == [0, 1]
    assert es["accuracy_mean"] == pytest.approx(0.91) and es["accuracy_std"] == pytest.approx(
        0.0141421, rel=1e-4
    )
    assert summarize(RUNS[:1])["softmax_es"]["accuracy_std"] is None  # one seed: no spread
    assert es["per_set"]["a"]["auroc_mean"] == pytest.approx(0.82)
    assert es["per_set"]["a"]["auroc_std"] == pytest.approx(0.0282843, rel=1e-4)
    assert es["auroc_mean"] == pytest.approx((0.75 + 0.79) / 2)  # mean over sets, then over seeds
    assert s["isomaxplus_mds"]["per_set"]["b"]["tnr_at_tpr95_mean"] == pytest.approx(0.61)
    assert "isomax_es" not in s  # no IsoMax runs given
    assert "isomaxplus_mds_class" not in s  # a score the runs do not have is left out


def test_claims_report_what_holds_and_where_not():
    text = "\n".join(claims(summarize(RUNS)))
    assert (
        "beats SoftMax with the entropic score (Table 3): **holds on most sets**" not in text
    )  # 1 of 2 is not most
    assert (
        "beats SoftMax with the entropic score (Table 3): **does not hold** (higher mean AUROC on 1/2 sets; not on b)"
        in text
    )
    assert (
        "On IsoMax+, MDS beats the entropic score (Table 6): **does not hold** (higher mean AUROC on 1/2 sets; not on b)"
        in text
    )
    assert "**holds** (IsoMax+ − SoftMax = +0.00 points)" in text


def test_tables_of_methods_not_in_the_study_say_so():
    from training.reproduce import _table

    only_isomaxplus = summarize(RUNS[2:])
    assert _table(only_isomaxplus, ["softmax_es", "isomax_es"], ["a", "b"]) == [
        "(no run of these methods in this study)"
    ]
    lines = _table(only_isomaxplus, ["softmax_es", "isomaxplus_mds"], ["a", "b"])
    assert len(lines) == 4 and "IsoMax+<sub>MDS</sub>" in lines[0] and "SoftMax" not in lines[0]


def test_a_method_without_some_set_gets_dashes_and_claims_compare_shared_sets():
    from training.reproduce import _table

    runs = [*RUNS[:2], *RUNS[2:]]
    open_only = run("isomaxplus", 0, 0.91, {"a": {"mds": 0.5, "es": 0.9, "mps": 0.9}})
    s = summarize(runs)
    s["isomaxplus_mds"]["per_set"]["held-out"] = summarize([open_only])["isomaxplus_mds"][
        "per_set"
    ]["a"]
    lines = _table(s, ["softmax_es", "isomaxplus_mds"], ["a", "held-out"])
    assert lines[-1] == "| held-out | – | 50.0 | – | **50.0** |"
    text = "\n".join(claims(s))  # held-out is only on one side: compared over a and b
    assert "(Table 3): **does not hold** (higher mean AUROC on 1/2 sets; not on b)" in text
