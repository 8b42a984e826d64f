"""The estimators behind the card's intervals, truncation flags and token-level agreement."""

from __future__ import annotations

import math

import pytest

from reap import quality


def sample(i: int, score: float, doc: str = "d", **extra) -> dict:
    return {"doc_id": i, "doc_hash": f"{doc}{i}", "prompt_hash": f"p{i}", "target_hash": f"t{i}", "acc": score, **extra}


def scores(values, doc: str = "d") -> dict[str, float]:
    return quality.item_scores([sample(i, v, doc) for i, v in enumerate(values)], "acc")


def test_identical_answers_recover_100_percent_within_noise():
    p = quality.paired_recovery(scores([1, 0, 1, 1]), scores([1, 0, 1, 1]))
    assert p["recovery"] == 1.0 and p["recovery_ci95"] == [1.0, 1.0] and p["diff"] == 0 and p["within_noise"]


def test_paired_interval_by_hand():
    q, s = [1, 1, 0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]  # 6/8 against 7/8: two losses, one gain
    p = quality.paired_recovery(scores(q), scores(s))
    d = [a - b for a, b in zip(q, s, strict=True)]
    mean_d = sum(d) / 8
    sd_d = math.sqrt(sum((x - mean_d) ** 2 for x in d) / 7)
    assert p["n"] == 8 and p["diff"] == pytest.approx(-1 / 8) and p["diff_se"] == pytest.approx(sd_d / math.sqrt(8))
    r = 6 / 7
    resid = [a - r * b for a, b in zip(q, s, strict=True)]
    se = math.sqrt(sum((x - sum(resid) / 8) ** 2 for x in resid) / 7) / (math.sqrt(8) * 7 / 8)
    assert p["recovery"] == pytest.approx(r) and p["recovery_se"] == pytest.approx(se)
    assert p["recovery_ci95"] == pytest.approx([r - 1.959964 * se, r + 1.959964 * se])
    assert p["within_noise"]  # -0.125 with an interval of about +-0.29


def test_a_consistent_loss_is_beyond_noise():
    q, s = [0] * 10 + [1] * 30, [1] * 40  # the quantized model loses 10 of 40, gains none
    p = quality.paired_recovery(scores(q), scores(s))
    assert p["recovery"] == pytest.approx(0.75) and not p["within_noise"] and p["recovery_ci95"][1] < 1


def test_only_the_same_documents_are_paired():
    assert quality.paired_recovery(scores([1, 0, 1]), scores([1, 0, 1], doc="other")) is None
    assert quality.paired_recovery(scores([1, 0, 1]), scores([1, 0])) is None
    assert quality.paired_recovery(scores([1]), scores([1])) is None  # no spread from one document
    zero = quality.paired_recovery(scores([0, 0]), scores([0, 0]))
    assert zero["recovery"] is None and zero["within_noise"]  # a source score of 0 has no ratio
    assert quality.items_digest([sample(0, 1)]) != quality.items_digest([sample(0, 1, doc="x")])


def test_corpus_metrics_have_no_per_document_score():
    assert quality.item_scores([sample(0, 1), {**sample(1, 1), "acc": ["gold", "pred"]}], "acc") is None
    assert quality.item_scores([sample(0, True)], "acc") == {"0:d0:p0:t0": 1.0}


def test_generation_checks_count_truncated_and_empty_answers():
    def gen(text: str, limit: int | None = 4) -> dict:
        kwargs = {"until": ["\n"]} | ({"max_gen_toks": limit} if limit else {})
        return {"arguments": [["Reverse: abc\nAnswer:", kwargs]], "resps": [[text]]}

    samples = [gen(" cba"), gen(" a b c d"), gen("  "), gen(" x y z w v", limit=None)]
    g = quality.generation_checks(samples, lambda text: len(text.split()), 256)
    assert g["n"] == 4 and g["truncated"] == 1 and g["empty"] == 1 and g["max_gen_toks"] == 4
    assert g["truncated_rate"] == 0.25 and quality.flagged(g)
    fine = quality.generation_checks([gen(" cba")] * 200, lambda text: 1, 256)
    assert not quality.flagged(fine) and not quality.flagged(None)
    # 2 of 200 is 1 %: not over it
    two = quality.generation_checks([gen(" cba")] * 198 + [gen("")] * 2, lambda text: 1, 256)
    assert two["empty_rate"] == 0.01 and not quality.flagged(two)


def lp(probs: dict[int, float]) -> dict[int, float]:
    return {t: math.log(p) for t, p in probs.items()}


def test_kl_is_zero_for_the_same_distribution_and_exact_on_the_full_support():
    p = {0: 0.7, 1: 0.2, 2: 0.1}
    q = {0: 0.5, 1: 0.3, 2: 0.2}
    assert quality.coarse_kl(lp(p), lp(p)) == 0.0
    exact = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    assert quality.coarse_kl(lp(p), lp(q)) == pytest.approx(exact)


def test_the_top_k_estimate_never_exceeds_the_true_kl():
    p = {0: 0.6, 1: 0.25, 2: 0.1, 3: 0.05}
    q = {0: 0.4, 1: 0.1, 2: 0.3, 3: 0.2}
    exact = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    top2_p, top2_q = lp({0: 0.6, 1: 0.25}), lp({0: 0.4, 2: 0.3})  # only token 0 is in both lists
    est = quality.coarse_kl(top2_p, top2_q)
    by_hand = 0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6)  # cells: {0}, the rest
    assert est == pytest.approx(by_hand) and 0 < est <= exact


def doc(tokens, tops):
    """A capture of one text: `tops` are {token: prob} at each position after the first."""
    return {
        "tokens": tokens,
        "logprobs": [math.log(top[t]) for top, t in zip(tops, tokens[1:], strict=True)],
        "top": [[[t, math.log(p)] for t, p in top.items()] for top in tops],
    }


def test_compare_logprobs():
    a = doc([5, 1, 2], [{1: 0.9, 2: 0.1}, {2: 0.8, 1: 0.2}])
    same = quality.compare_logprobs([a, a], [a, a])
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1 and same["positions"] == 4 and same["docs"] == 2
    assert same["perplexity_source"] == same["perplexity_quantized"] == pytest.approx(math.exp(-math.log(0.72) / 2))
    b = doc([5, 1, 2], [{1: 0.9, 2: 0.1}, {1: 0.6, 2: 0.4}])  # the second position's top-1 flips
    diff = quality.compare_logprobs([a], [b])
    assert diff["top1_agreement"] == 0.5 and diff["kl_mean"] > 0 and diff["top1_agreement_se"] is None
    other = doc([5, 2, 2], [{2: 0.5, 1: 0.5}, {2: 0.8, 1: 0.2}])
    assert quality.compare_logprobs([a, a], [a, other])["mismatched_docs"] == 1


def test_clustered_mean():
    mean, se = quality.clustered_mean([[1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert mean == pytest.approx(1 / 3)
    # cluster totals 2 and 0 against 2 * 1/3 and 4 * 1/3: residuals 4/3 and -4/3, g = 2
    assert se == pytest.approx(math.sqrt(2 * (16 / 9 + 16 / 9)) / 6)
