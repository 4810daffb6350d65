"""The entropy study's verdict rule, checked on the article's own table and on cases that must fail."""

from kexue.studies.entropy import LENGTHS, claim_check

ARTICLE_O = [43.27, 36.53, 23.02, 15.12, 11.54]
ARTICLE_E = [43.11, 41.17, 34.04, 20.15, 13.58]


def test_article_table_satisfies_the_claim():
    assert tuple(LENGTHS) == (64, 128, 256, 512, 1024)
    c = claim_check(ARTICLE_O, ARTICLE_E)
    assert c["verdict"] == "holds" and c["at_train"] and c["ahead"] and c["gap256_ge_5"]
    gaps = [round(g, 2) for g in c["gaps"]]
    assert gaps == [-0.16, 4.64, 11.02, 5.03, 2.04]


def test_claim_fails_when_e_is_behind_or_hurts_the_training_length():
    assert claim_check(ARTICLE_O, ARTICLE_O)["verdict"] == "does not hold"   # no gain anywhere
    worse_at_64 = [ARTICLE_E[0] - 2.0] + ARTICLE_E[1:]
    assert claim_check(ARTICLE_O, worse_at_64)["verdict"] == "partly holds"   # ahead and big, but -2.16 at 64
    small_gain = [o + 1.0 for o in ARTICLE_O]
    c = claim_check(ARTICLE_O, small_gain)
    assert c["verdict"] == "partly holds" and not c["gap256_ge_5"]
    behind_at_1024 = ARTICLE_E[:-1] + [ARTICLE_O[-1] - 0.5]
    assert claim_check(ARTICLE_O, behind_at_1024)["verdict"] == "does not hold"
