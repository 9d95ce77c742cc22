"""Event scores come from sed_eval: known events in, the numbers the DCASE definitions give out.

Every expected value is worked out by hand in the comments from the definitions in
:mod:`util.night.scoring`: an estimate hits a reference of its label when the onsets are
within the collar (0.2 s) and the offsets within max(0.2 s, 20 % of the reference's
length), one to one; P = tp / n_est, R = tp / n_ref, F1 = 2PR / (P + R); segments are 1 s
and a class is active in every segment its events overlap.
"""

from __future__ import annotations

import logging

import pytest

from util.night import Event, evaluate_events, read_events_csv, write_events_csv


def _prf(result: dict, label: str | None = None) -> tuple:
    """(precision, recall, F1) of one class, or overall for ``None``; ``result`` or its ``segment``."""
    scores = result["micro"] if label is None else result["per_class"][label]
    return scores["precision"], scores["recall"], scores["f1"]


def test_event_f1_per_class_with_dcase_collars():
    ref = [
        Event(5.0, 15.0, "snore"),  # A: 10 s long, offset collar max(0.2, 2.0) = 2.0 s
        Event(30.0, 31.0, "snore"),  # B: 1 s long, offset collar max(0.2, 0.2) = 0.2 s
        Event(50.0, 60.0, "snore"),  # C
        Event(70.0, 80.0, "breathe"),  # D
    ]
    est = [
        Event(5.2, 16.5, "snore"),  # onset exactly on the 0.2 s collar, offset 1.5 s late: hits A
        Event(30.0, 31.25, "snore"),  # offset 0.25 s late, collar 0.2 s: misses B
        Event(50.25, 60.0, "snore"),  # onset 0.25 s late: misses C
        Event(70.0, 80.0, "snore"),  # D's time, wrong label: a false alarm of snore
        Event(70.1, 79.9, "breathe"),  # hits D
        Event(90.0, 95.0, "breathe"),  # nothing there: a false alarm
    ]
    r = evaluate_events(ref, est)
    assert r["params"]["collar_s"] == 0.2 and r["params"]["offset_ratio"] == 0.2
    assert r["params"]["library"].startswith("sed_eval ")
    snore, breathe = r["per_class"]["snore"], r["per_class"]["breathe"]
    # snore: 1 hit of 4 estimates and 3 references -> P 1/4, R 1/3, F1 2(1/12)/(7/12) = 2/7
    assert (snore["tp"], snore["fp"], snore["fn"], snore["n_ref"], snore["n_est"]) == (
        1,
        3,
        2,
        3,
        4,
    )
    assert _prf(r, "snore") == pytest.approx((1 / 4, 1 / 3, 2 / 7))
    # breathe: 1 hit of 2 estimates and 1 reference -> P 1/2, R 1, F1 2/3
    assert (breathe["tp"], breathe["fp"], breathe["fn"]) == (1, 1, 0)
    assert _prf(r, "breathe") == pytest.approx((1 / 2, 1.0, 2 / 3))
    # overall: 2 hits, 6 estimates, 4 references -> P 1/3, R 1/2, F1 2(1/6)/(5/6) = 2/5
    assert (r["micro"]["tp"], r["micro"]["fp"], r["micro"]["fn"]) == (2, 4, 2)
    assert _prf(r) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    # class average (2/7 + 2/3) / 2 = 10/21
    assert r["macro_f1"] == pytest.approx(10 / 21)
    # no leftover estimate sits on a leftover reference's times, so no substitutions:
    # ER = (S + D + I) / N = (0 + 2 + 4) / 4
    assert r["micro"]["substitutions"] == 0
    assert r["micro"]["error_rate"] == pytest.approx(1.5)

    # Onset only: B's late offset no longer matters -> snore 2 hits, F1 2(2/4)(2/3)/(7/6) = 4/7
    onset_only = evaluate_events(ref, est, evaluate_offset=False)
    assert onset_only["per_class"]["snore"]["tp"] == 2
    assert onset_only["per_class"]["snore"]["f1"] == pytest.approx(4 / 7)
    # A wider collar (0.3 s) also takes C (onset 0.25 s late) and B (offset 0.25 s late)
    wide = evaluate_events(ref, est, collar_s=0.3)
    assert wide["per_class"]["snore"]["tp"] == 3


def test_collar_edges_are_inclusive_and_the_offset_collar_grows_with_length():
    ref = [Event(100.0, 200.0, "snore")]  # 100 s long: offset collar max(0.2, 20) = 20 s
    on_edge = [Event(100.2, 220.0, "snore")]  # onset +0.2 s, offset +20 s: both on the edge
    assert evaluate_events(ref, on_edge)["per_class"]["snore"]["tp"] == 1
    past_onset = [Event(100.21, 200.0, "snore")]
    assert evaluate_events(ref, past_onset)["per_class"]["snore"]["tp"] == 0
    past_offset = [Event(100.0, 220.01, "snore")]
    assert evaluate_events(ref, past_offset)["per_class"]["snore"]["tp"] == 0
    early = [Event(99.8, 180.0, "snore")]  # collars hold both ways: 0.2 s early, 20 s early
    assert evaluate_events(ref, early)["per_class"]["snore"]["tp"] == 1
    # offset_ratio 0.5 (sed_eval's own default): the collar becomes 50 s
    assert (
        evaluate_events(ref, [Event(100.0, 249.0, "snore")], offset_ratio=0.5)["micro"]["tp"] == 1
    )


def test_matching_is_one_to_one_and_optimal():
    # A bout detected as two halves: the first half's offset is 50 s early (collar 20 s),
    # the second's onset 50 s late, so neither is a hit: 0 tp, 2 fp, 1 fn.
    bout = [Event(100.0, 200.0, "snore")]
    halves = [Event(100.0, 150.0, "snore"), Event(150.0, 200.0, "snore")]
    r = evaluate_events(bout, halves)
    assert (r["micro"]["tp"], r["micro"]["fp"], r["micro"]["fn"]) == (0, 2, 1)
    # Onset only, the first half hits and the second stays a false alarm: P 1/2, R 1, F1 2/3.
    assert _prf(evaluate_events(bout, halves, evaluate_offset=False)) == pytest.approx(
        (1 / 2, 1.0, 2 / 3)
    )
    # Two estimates on one reference: one hit, one false alarm.
    twice = evaluate_events(bout, [Event(100.0, 200.0, "snore"), Event(100.1, 200.1, "snore")])
    assert (twice["micro"]["tp"], twice["micro"]["fp"]) == (1, 1)
    # Optimal, not greedy: E1 (onset 10.5) fits R1 (10.0) and R2 (10.6) with a 0.5 s collar,
    # E2 (10.0) fits R1 only. Giving E1 to R1 first would leave R2 unmatched; the maximum
    # matching (E1-R2, E2-R1) finds both.
    refs = [Event(10.0, 12.0, "snore"), Event(10.6, 12.6, "snore")]
    ests = [Event(10.5, 12.5, "snore"), Event(10.0, 12.0, "snore")]
    assert evaluate_events(refs, ests, collar_s=0.5, evaluate_offset=False)["micro"]["tp"] == 2


def test_substitutions_count_once_in_the_error_rate():
    # Right time, wrong label: snore missed and breathe falsely found (F1 sees 1 fn + 1 fp),
    # but the error rate counts one substitution: ER = (S + D + I) / N = (1 + 0 + 0) / 1.
    r = evaluate_events([Event(0.0, 10.0, "snore")], [Event(0.0, 10.0, "breathe")])
    assert r["micro"]["substitutions"] == 1
    assert r["micro"]["error_rate"] == pytest.approx(1.0)
    assert (r["micro"]["tp"], r["micro"]["fp"], r["micro"]["fn"]) == (0, 1, 1)
    assert r["micro"]["f1"] == 0.0


def test_segment_f1_per_class_on_one_second_segments():
    ref = [
        Event(0.5, 2.0, "snore"),  # segments 0 and 1 (floor 0.5 = 0, ceil 2.0 = 2, exclusive)
        Event(4.2, 4.8, "snore"),  # segment 4
        Event(5.0, 6.0, "breathe"),  # segment 5
    ]
    est = [
        Event(1.0, 3 * 0.1 * 10, "snore"),  # ends at 3.0000000000000004 s: segments 1 and 2 only
        Event(5.5, 6.0, "breathe"),  # segment 5
    ]
    r = evaluate_events(ref, est)
    seg = r["segment"]
    assert seg["n_segments"] == 6 and r["params"]["segment_s"] == 1.0
    # snore: reference {0, 1, 4}, estimate {1, 2} -> tp 1, fp 1, fn 2:
    # P 1/2, R 1/3, F1 2(1/6)/(5/6) = 2/5 (float noise lighting segment 3 would make it fp 2)
    snore = seg["per_class"]["snore"]
    assert (snore["tp"], snore["fp"], snore["fn"], snore["n_ref"], snore["n_est"]) == (
        1,
        1,
        2,
        3,
        2,
    )
    assert (snore["precision"], snore["recall"], snore["f1"]) == pytest.approx(
        (1 / 2, 1 / 3, 2 / 5)
    )
    # breathe: {5} and {5} -> F1 1
    assert seg["per_class"]["breathe"]["f1"] == 1.0
    # overall: tp 2, fp 1, fn 2 -> P 2/3, R 1/2, F1 2(1/3)/(7/6) = 4/7;
    # class average (2/5 + 1) / 2 = 7/10
    assert (seg["micro"]["tp"], seg["micro"]["fp"], seg["micro"]["fn"]) == (2, 1, 2)
    assert _prf(r["segment"]) == pytest.approx((2 / 3, 1 / 2, 4 / 7))
    assert seg["macro_f1"] == pytest.approx(7 / 10)
    # per segment S/D/I: 0 D, 1 -, 2 I, 3 -, 4 D, 5 - -> ER = (0 + 2 + 1) / 4 active = 3/4
    assert seg["micro"]["error_rate"] == pytest.approx(3 / 4)
    # The event view of the same lists is stricter: only breathe's [5.5, 6.0] vs [5.0, 6.0]
    # could hit, and its onset is 0.5 s late -> no hit at all.
    assert r["micro"]["tp"] == 0

    # The recording's real length adds empty segments (true negatives): F1 unchanged.
    longer = evaluate_events(ref, est, duration_s=10.0)
    assert longer["segment"]["n_segments"] == 10
    assert longer["segment"]["micro"]["f1"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="duration_s"):
        evaluate_events(ref, est, duration_s=5.0)
    # 0.5 s segments: snore reference {1, 2, 3, 8, 9}, estimate {2, 3, 4, 5}: tp 2, fp 2, fn 3
    # -> P 1/2, R 2/5, F1 2(1/5)/(9/10) = 4/9
    half = evaluate_events(ref, est, labels=["snore"], segment_s=0.5)["segment"]
    assert half["per_class"]["snore"]["f1"] == pytest.approx(4 / 9)


def test_missed_and_unreferenced_classes():
    ref = [Event(10.0, 20.0, "snore"), Event(30.0, 40.0, "breathe")]
    est = [Event(30.0, 40.0, "breathe"), Event(50.0, 55.0, "non_wearer")]
    r = evaluate_events(ref, est, labels=["snore", "breathe", "non_wearer", "cough"])
    # snore references, never detected: precision 0 by DCASE's zero_score rule, so F1 0
    assert _prf(r, "snore") == (0.0, 0.0, 0.0)
    # non_wearer only false alarms: recall (0/0) and so F1 are undefined
    assert r["per_class"]["non_wearer"]["recall"] is None
    assert r["per_class"]["non_wearer"]["f1"] is None
    assert r["per_class"]["non_wearer"]["fp"] == 1
    # cough: nothing either side, nothing defined to average
    assert r["per_class"]["cough"]["f1"] is None
    # the class average runs over the defined F1s: (0 + 1) / 2
    assert r["macro_f1"] == pytest.approx(0.5)
    nothing = evaluate_events([], [], labels=["snore"])
    assert nothing["micro"]["f1"] is None and nothing["macro_f1"] is None
    assert nothing["segment"]["micro"]["f1"] is None


def test_unscored_labels_are_left_out_and_counted(caplog):
    ref = [Event(10.0, 20.0, "snore"), Event(30.0, 40.0, "quiet")]
    est = [Event(10.0, 20.0, "snore"), Event(30.0, 40.0, "breathe"), Event(50.0, 60.0, "breathe")]
    with caplog.at_level(logging.INFO, logger="util.night.scoring"):
        r = evaluate_events(ref, est, labels=["snore"])
    assert list(r["per_class"]) == ["snore"]
    assert r["micro"]["f1"] == 1.0  # the breathe estimates are not false alarms of snore
    assert r["ignored"] == {"reference": {"quiet": 1}, "estimated": {"breathe": 2}}
    assert "unscored labels" in caplog.text
    # default labels: every label of either list, sorted
    assert list(evaluate_events(ref, est)["per_class"]) == ["breathe", "quiet", "snore"]


def test_scores_events_files_written_to_disk(tmp_path):
    truth = [Event(12.3, 70.0, "snore"), Event(100.0, 130.0, "breathe")]
    found = [Event(12.5, 71.0, "snore", 0.9), Event(100.0, 129.0, "breathe", 0.7)]
    write_events_csv(truth, tmp_path / "truth.csv")
    write_events_csv(found, tmp_path / "events.csv")
    r = evaluate_events(
        read_events_csv(tmp_path / "truth.csv"), read_events_csv(tmp_path / "events.csv")
    )
    # snore: onset 0.2 s late (on the collar), offset 1 s late (collar 20 % of 57.7 s = 11.54 s);
    # breathe: onset exact, offset 1 s early (collar 6 s) -> both hit
    assert r["micro"]["tp"] == 2 and r["micro"]["f1"] == 1.0


@pytest.mark.parametrize(
    ("event", "kwargs", "message"),
    [
        (Event(5.0, 5.0, "snore"), {}, "end_s > start_s"),
        (Event(5.0, 4.0, "snore"), {}, "end_s > start_s"),
        (Event(float("nan"), 4.0, "snore"), {}, "finite"),
        (Event(-1.0, 4.0, "snore"), {}, "start_s >= 0"),
        (Event(1.0, 4.0, "snore"), {"collar_s": 0.0}, "collar_s"),
        (Event(1.0, 4.0, "snore"), {"offset_ratio": 1.5}, "offset_ratio"),
        (Event(1.0, 4.0, "snore"), {"segment_s": -1.0}, "segment_s"),
        (Event(1.0, 4.0, "snore"), {"evaluate_onset": False, "evaluate_offset": False}, "both off"),
    ],
)
def test_bad_input_is_a_clear_error(event, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_events([Event(1.0, 4.0, "snore")], [event], **kwargs)
