from pathlib import Path

import numpy as np
import pytest

import cascadia.quality.cascade_replay as replay_module
from cascadia.quality import (
    QualityFormatError,
    QualityProfile,
    builtin_profile_path,
    candidate_thresholds,
    load_mtbench_prompts,
    load_quality,
    match_requests,
    replay,
    save_quality_long,
    sniff_quality_format,
    stop_stages,
)

DATA = Path(__file__).parent / "data"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def profile(routing, quality=None, models=None) -> QualityProfile:
    routing = np.asarray(routing, dtype=float)
    quality = routing if quality is None else np.asarray(quality, dtype=float)
    n_requests, n_models = routing.shape
    return QualityProfile(
        models=tuple(models or (f"m{i}" for i in range(n_models))),
        request_ids=tuple(f"r{i}" for i in range(n_requests)),
        routing_scores=routing,
        quality_scores=quality,
        score_range=(0.0, 10.0),
        single_score=quality is routing,
        source="test",
    )


def loop_reference(prof: QualityProfile, thresholds: np.ndarray):
    """Plain per-request walk down the cascade, the definition replay must match."""
    n_requests, n_stages = prof.routing_scores.shape
    stops = []
    for r in range(n_requests):
        stage = n_stages - 1
        for i in range(n_stages - 1):
            if prof.routing_scores[r, i] >= thresholds[i]:
                stage = i
                break
        stops.append(stage)
    stops = np.array(stops)
    quality = np.mean([prof.quality_scores[r, s] for r, s in enumerate(stops)])
    stop_shares = np.array([np.mean(stops == i) for i in range(n_stages)])
    stage_shares = np.array([np.mean(stops >= i) for i in range(n_stages)])
    return quality, stage_shares, stop_shares


# ---- loaders ---------------------------------------------------------------------


def test_long_fixture_with_both_scores_and_prompts():
    prof = load_quality(DATA / "quality_long_small.csv")
    assert prof.source == "long:quality_long_small.csv"
    assert prof.models == ("small", "large")  # small has the lower mean quality
    assert prof.request_ids == ("r0", "r1", "r2")
    np.testing.assert_array_equal(prof.routing_scores, [[3, 9], [7, 2], [5, 6]])
    np.testing.assert_array_equal(prof.quality_scores, [[0.3, 0.9], [0.7, 0.2], [0.5, 0.6]])
    assert not prof.single_score
    assert prof.score_range == (0.2, 9.0)
    assert prof.prompts == ("What is 2+2?", "Name a prime.", "Spell cat.")


def test_long_without_quality_column_is_single_score_and_orders_weakest_first(tmp_path):
    path = write(
        tmp_path,
        "q.csv",
        "request_id,model,routing_score,input_tokens\n"
        "a,big,1,10\na,tiny,0,10\nb,big,1,12\nb,tiny,1,12\n",
    )
    prof = load_quality(path)
    assert prof.single_score
    assert prof.models == ("tiny", "big")
    np.testing.assert_array_equal(prof.quality_scores, prof.routing_scores)
    assert prof.score_range == (0.0, 1.0)
    assert any("input_tokens" in note for note in prof.notes)
    assert prof.prompts is None


@pytest.mark.parametrize(
    "bad_row, what",
    [
        ("b,small,high,1", "routing_score is not a number: 'high'"),
        ("a,small,4,4", "second score for request 'a', model 'small'"),
        ("b,small,4", "expected 4 fields"),
        (",small,4,4", "empty request_id or model"),
    ],
)
def test_long_malformed_rows_name_file_and_line(tmp_path, bad_row, what):
    path = write(
        tmp_path,
        "q.csv",
        "request_id,model,routing_score,quality_score\na,small,1,1\na,large,2,2\n" + bad_row + "\n",
    )
    with pytest.raises(QualityFormatError) as err:
        load_quality(path, "long")
    assert str(err.value).startswith(f"{path}:4: ")
    assert what in str(err.value)


def test_missing_column_and_empty_file(tmp_path):
    path = write(tmp_path, "q.csv", "request_id,model,score\na,b,1\n")
    with pytest.raises(QualityFormatError, match=r":1: missing column\(s\) \['routing_score'\]"):
        load_quality(path, "long")
    with pytest.raises(QualityFormatError, match="empty"):
        load_quality(write(tmp_path, "e.csv", ""))


def test_requests_missing_a_model_are_dropped_and_counted(tmp_path):
    path = write(
        tmp_path,
        "q.csv",
        "request_id,model,routing_score\na,s,1\na,l,2\nb,s,3\nc,s,4\nc,l,\n",
    )
    with pytest.warns(UserWarning, match="dropped 2 request"):
        prof = load_quality(path)
    assert prof.request_ids == ("a",)
    assert prof.n_dropped == 2
    assert "b, c" in prof.notes[-1]


def test_mtbench_small_file_names_scores_and_failed_judgements(tmp_path):
    path = write(
        tmp_path,
        "mt.csv",
        "question_id,turn,category,model,score\n"
        "81,1,writing,gpt-4-1106-preview,10\n"
        "81,1,writing,mistralai/Mixtral-8x7B-Instruct-v0.1,9.0\n"
        "81,2,writing,gpt-4-1106-preview,9\n"
        "81,2,writing,mistralai/Mixtral-8x7B-Instruct-v0.1,2.0\n"
        "82,1,math,gpt-4-1106-preview,-1\n"
        "82,1,math,mistralai/Mixtral-8x7B-Instruct-v0.1,3\n",
    )
    assert sniff_quality_format(path) == "mtbench"
    with pytest.warns(UserWarning, match="dropped 1"):
        prof = load_quality(path)
    assert prof.models == ("mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")
    assert prof.request_ids == ("81-1", "81-2")
    np.testing.assert_array_equal(prof.routing_scores, [[9.0, 10.0], [2.0, 9.0]])
    assert prof.single_score and prof.score_range == (1.0, 10.0)
    assert prof.n_dropped == 1
    assert any("missing or negative" in note for note in prof.notes)


def test_mtbench_score_outside_scale_is_an_error(tmp_path):
    path = write(tmp_path, "mt.csv", "question_id,turn,category,model,score\n81,1,w,m,11\n")
    with pytest.raises(QualityFormatError, match=r"mt\.csv:2: score 11.0 is outside"):
        load_quality(path)


def test_wide_format_metadata_columns_and_prompts(tmp_path):
    path = write(
        tmp_path,
        "w.csv",
        "id,prompt,prompt_chars,weak,strong\n1,add,3,0,1\n2,sub,3,1,1\n3,mul,3,0,0\n",
    )
    prof = load_quality(path)
    assert prof.source == "wide:w.csv"
    assert prof.models == ("weak", "strong")
    assert prof.single_score and prof.score_range == (0.0, 1.0)
    assert prof.prompts == ("add", "sub", "mul")
    np.testing.assert_array_equal(prof.routing_scores[:, 1], [1, 1, 0])


def test_wide_bad_value_names_line(tmp_path):
    path = write(tmp_path, "w.csv", "id,weak,strong\n1,0,1\n2,yes,1\n")
    with pytest.raises(QualityFormatError, match=r"w\.csv:3: weak is not a number"):
        load_quality(path, "wide")


def test_save_then_load_round_trip(tmp_path):
    prof = load_quality(DATA / "quality_long_small.csv")
    out = tmp_path / "saved.csv"
    save_quality_long(prof, out)
    again = load_quality(out)
    assert again.models == prof.models and again.request_ids == prof.request_ids
    np.testing.assert_array_equal(again.routing_scores, prof.routing_scores)
    np.testing.assert_array_equal(again.quality_scores, prof.quality_scores)
    assert again.prompts == prof.prompts
    gsm = load_quality(builtin_profile_path("gsm8k"))
    save_quality_long(gsm, tmp_path / "gsm.csv")
    assert load_quality(tmp_path / "gsm.csv").single_score


def test_real_mtbench_profile():
    prof = load_quality(builtin_profile_path("mtbench"))
    assert prof.models == ("mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")
    assert prof.n_requests == 160 and prof.n_dropped == 0
    assert prof.single_score and prof.score_range == (1.0, 10.0)
    row = prof.request_ids.index("81-2")
    assert prof.routing_scores[row, prof.column("mistralai/Mixtral-8x7B-Instruct-v0.1")] == 9.0
    assert prof.routing_scores[row, prof.column("gpt-4-1106-preview")] == 10.0


def test_real_gsm8k_profile_is_single_score_binary():
    prof = load_quality(builtin_profile_path("gsm8k"))
    assert prof.single_score
    assert prof.score_range == (0.0, 1.0)
    assert prof.n_requests == 1319
    assert prof.models == ("mixtral-8x7b-instruct", "gpt-4-1106-preview")  # no prompt_chars
    assert prof.routing_scores.sum(axis=0).tolist() == [842.0, 1130.0]


def test_mtbench_prompts_attach_to_profile():
    prompts = load_mtbench_prompts()
    assert len(prompts) == 160
    assert prompts["81-1"].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    prof = load_quality(builtin_profile_path("mtbench")).with_prompts(prompts)
    assert prof.prompts[prof.request_ids.index("81-2")].startswith("Rewrite your previous response")


def test_column_and_restrict():
    prof = load_quality(DATA / "quality_long_small.csv")
    with pytest.raises(KeyError, match=r"'medium'.*available: \['small', 'large'\]"):
        prof.column("medium")
    swapped = prof.restrict(["large", "small"])
    assert swapped.models == ("large", "small")
    np.testing.assert_array_equal(swapped.routing_scores[:, 0], prof.routing_scores[:, 1])
    assert prof.restrict(["large"]).routing_scores.shape == (3, 1)
    with pytest.raises(ValueError, match="duplicate"):
        prof.restrict(["large", "large"])
    rows = prof.to_long_rows()
    assert len(rows) == 6
    assert rows[1] == {
        "request_id": "r0", "model": "large", "routing_score": 9.0, "quality_score": 0.9,
        "prompt": "What is 2+2?",
    }


def test_builtin_profile_path_unknown_name():
    with pytest.raises(KeyError, match="gsm8k"):
        builtin_profile_path("mmlu")


# ---- replay ----------------------------------------------------------------------

TWO_STAGE = profile([[3, 9], [7, 2], [5, 6]], [[0.3, 0.9], [0.7, 0.2], [0.5, 0.6]])
THREE_STAGE = profile(
    [[3, 8, 0], [7, 1, 0], [5, 4, 0]],
    [[0.3, 0.8, 1.0], [0.7, 0.1, 0.9], [0.5, 0.4, 0.95]],
)


def test_replay_two_stage_hand_computed():
    result = replay(TWO_STAGE, np.array([[5.0], [6.0]]))
    # h=5: r0 (3<5) -> large 0.9; r1 (7>=5) -> small 0.7; r2 (5>=5) -> small 0.5
    # h=6: r0 -> large 0.9; r1 -> small 0.7; r2 (5<6) -> large 0.6
    np.testing.assert_allclose(result.mean_quality, [2.1 / 3, 2.2 / 3])
    np.testing.assert_allclose(result.stop_shares, [[2 / 3, 1 / 3], [1 / 3, 2 / 3]])
    np.testing.assert_allclose(result.stage_shares, [[1, 1 / 3], [1, 2 / 3]])
    assert stop_stages(TWO_STAGE, [5.0]).tolist() == [1, 0, 0]


def test_replay_three_stage_hand_computed():
    result = replay(THREE_STAGE, [[6.0, 4.0], [6.0, 5.0]])
    # (6,4): r0 3<6, 8>=4 -> 1; r1 7>=6 -> 0; r2 5<6, 4>=4 -> 1
    # (6,5): r0 -> 1; r1 -> 0; r2 4<5 -> 2
    np.testing.assert_allclose(result.mean_quality, [1.9 / 3, 2.45 / 3])
    np.testing.assert_allclose(result.stop_shares, [[1 / 3, 2 / 3, 0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(result.stage_shares, [[1, 2 / 3, 0], [1, 2 / 3, 1 / 3]])
    assert stop_stages(THREE_STAGE, [[6.0, 5.0]]).tolist() == [[1, 0, 2]]


def test_one_dimensional_thresholds_give_k_equal_one():
    result = replay(THREE_STAGE, [6.0, 5.0])
    assert result.mean_quality.shape == (1,)
    assert result.stage_shares.shape == (1, 3) and result.stop_shares.shape == (1, 3)


def test_extreme_thresholds_send_everything_to_first_or_last_stage():
    for prof in (TWO_STAGE, THREE_STAGE, load_quality(builtin_profile_path("mtbench"))):
        n_stages = len(prof.models)
        first = replay(prof, np.full(n_stages - 1, -np.inf))
        last = replay(prof, np.full(n_stages - 1, np.inf))
        assert first.stop_shares[0, 0] == 1.0 and first.stage_shares[0, 1:].sum() == 0.0
        assert last.stop_shares[0, -1] == 1.0 and np.all(last.stage_shares[0] == 1.0)
        assert first.mean_quality[0] == pytest.approx(prof.quality_scores[:, 0].mean())
        assert last.mean_quality[0] == pytest.approx(prof.quality_scores[:, -1].mean())


def test_vectorised_replay_matches_loop_on_real_mtbench():
    prof = load_quality(builtin_profile_path("mtbench"))
    rng = np.random.default_rng(0)
    grid = np.concatenate([candidate_thresholds(prof, 0), rng.uniform(0, 11, 40), [-5.0, 1.0, 9.5]])
    result = replay(prof, grid[:, None])
    assert len(set(np.round(result.mean_quality, 9))) > 5  # the grid really varies Q
    for k, h in enumerate(grid):
        quality, stage_shares, stop_shares = loop_reference(prof, [h])
        assert result.mean_quality[k] == pytest.approx(quality)
        np.testing.assert_allclose(result.stage_shares[k], stage_shares)
        np.testing.assert_allclose(result.stop_shares[k], stop_shares)


def test_vectorised_replay_matches_loop_on_three_stages_with_ties():
    rng = np.random.default_rng(1)
    prof = profile(rng.integers(1, 6, size=(50, 3)), rng.uniform(0, 1, size=(50, 3)))
    grid = rng.integers(0, 7, size=(60, 2)).astype(float)
    result = replay(prof, grid)
    for k, thresholds in enumerate(grid):
        quality, stage_shares, stop_shares = loop_reference(prof, thresholds)
        assert result.mean_quality[k] == pytest.approx(quality)
        np.testing.assert_allclose(result.stage_shares[k], stage_shares)
        np.testing.assert_allclose(result.stop_shares[k], stop_shares)


def test_chunked_replay_equals_one_shot(monkeypatch):
    prof = load_quality(builtin_profile_path("mtbench"))
    grid = np.linspace(0, 11, 97)[:, None]
    whole = replay(prof, grid)
    monkeypatch.setattr(replay_module, "_MAX_CELLS_PER_CHUNK", 1000)  # ~3 thresholds a chunk
    chunked = replay(prof, grid)
    np.testing.assert_array_equal(chunked.mean_quality, whole.mean_quality)
    np.testing.assert_array_equal(chunked.stage_shares, whole.stage_shares)
    np.testing.assert_array_equal(stop_stages(prof, grid), np.stack([stop_stages(prof, g) for g in grid]))


def test_single_model_profile_always_stops_at_stage_zero():
    prof = profile([[1.0], [2.0]])
    result = replay(prof, np.zeros((3, 0)))
    np.testing.assert_array_equal(result.stop_shares, np.ones((3, 1)))
    assert result.mean_quality.tolist() == [1.5, 1.5, 1.5]


def test_bad_threshold_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(K, 2\)"):
        replay(THREE_STAGE, [1.0])
    with pytest.raises(ValueError, match="NaN"):
        replay(TWO_STAGE, [np.nan])


def test_candidate_thresholds_are_the_only_change_points():
    cands = candidate_thresholds(TWO_STAGE, 0)
    np.testing.assert_array_equal(cands, [3.0, 5.0, 7.0, 8.0])
    assert stop_stages(TWO_STAGE, [cands[-1]]).tolist() == [1, 1, 1]
    # Any threshold strictly between two candidates behaves like the upper one.
    between = replay(TWO_STAGE, [[4.0], [5.0], [6.5], [7.0]])
    np.testing.assert_array_equal(between.stop_shares[0], between.stop_shares[1])
    np.testing.assert_array_equal(between.stop_shares[2], between.stop_shares[3])
    np.testing.assert_array_equal(candidate_thresholds(THREE_STAGE, 1), [1.0, 4.0, 8.0, 9.0])
    with pytest.raises(ValueError, match="no threshold"):
        candidate_thresholds(THREE_STAGE, 2)


def test_match_requests_is_seeded_and_in_range():
    prof = load_quality(builtin_profile_path("gsm8k"))
    rows = match_requests(prof, 5000, seed=11)
    assert rows.shape == (5000,) and rows.min() >= 0 and rows.max() < prof.n_requests
    np.testing.assert_array_equal(rows, match_requests(prof, 5000, seed=11))
    assert not np.array_equal(rows, match_requests(prof, 5000, seed=12))
    assert len(np.unique(rows)) > 1000  # sampled across the profile, not a few rows
