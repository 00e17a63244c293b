"""The evaluation table: labels never understate a baseline's epsilon; the gain share."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from pmixed.eval.report import epsilon_label, gain_kept, markdown_table, table_rows


def test_epsilon_label_rounds_up():
    # 8.0014 is what Opacus reported for one DP-SGD run calibrated to 8 (README): ".3g" printed "8"
    assert epsilon_label(8.001387961511337) == "8.01"
    assert epsilon_label(7.996383591517711) == "8"
    assert epsilon_label(7.99) == "7.99"
    assert epsilon_label(8.0) == "8"
    assert epsilon_label(0.12345) == "0.124"
    assert epsilon_label(123.4) == "124"


@given(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False))
def test_epsilon_label_is_never_below_the_value(eps):
    shown = float(epsilon_label(eps))
    assert shown >= eps * (1 - 1e-12)
    assert shown <= eps * (1 + 1e-2) + 1e-12  # three significant figures


def test_table_labels_and_gain():
    result = {
        "models": {"public": {"ppl": 40.0}, "finetune": {"ppl": 30.0}, "dpsgd": {"ppl": 35.0},
                   "dpsgd_unit": {"ppl": 36.0}},
        "baseline_epsilon": {"dpsgd": 8.0014, "dpsgd_unit": 7.993},
        "unit_name": "sender",
        "pmixed": [{"epsilon": 8.0, "members": 80, "sample_rate": 0.5, "queries": 1024,
                    "ppl_mean": 34.0, "ppl_std": 0.1, "runs": 8}],
    }
    rows = {r["key"]: r for r in table_rows(result)}
    assert rows["dpsgd"]["model"] == "DP-SGD eps=8.01"
    assert rows["dpsgd_unit"]["model"] == "DP-SGD per sender eps=8"
    assert math.isclose(rows["pmixed"]["gain_kept"], 0.6)
    assert math.isclose(rows["dpsgd"]["gain_kept"], gain_kept(40.0, 35.0, 30.0)) and rows["dpsgd"]["gain_kept"] == 0.5
    md = markdown_table(list(rows.values()))
    assert "| PMixED eps=8 (N=80, q=0.5, T=1024) | 34.00 ± 0.10 (8 runs) | 60% |" in md
