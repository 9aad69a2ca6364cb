"""A growing index: built in three parts (in memory, on disk, from several compute_codes
outputs on Spark) it answers exactly as one built at once; removing ids answers as an
index built without them."""

import numpy as np
import pytest
from spark_helpers import run_driver

from lopq import LOPQModel, LOPQSearcher
from lopq.datasets import make_clustered
from lopq.formats import format_code_lines, write_vector_file


@pytest.fixture(scope="module")
def setup():
    X = make_clustered(3000, 16, n_clusters=12, seed=11)
    queries = make_clustered(60, 16, n_clusters=12, seed=12)
    model = LOPQModel(V=8, M=4, subquantizer_clusters=32).fit(X, n_init=1, random_state=0)
    coarse, fine = model.encode(X)
    ids = np.arange(3000) * 7 + 1  # ids that are not row numbers
    return model, X, queries, coarse, fine, ids


def answers(searcher, queries):
    return [(list(ids), d.tolist()) for ids, d in
            searcher.search_batch(queries, quota=400, limit=20)]


def thirds(n):
    return [slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n)]


def test_an_index_added_to_in_three_parts_answers_as_one_built_at_once(setup):
    model, X, queries, coarse, fine, ids = setup
    whole = LOPQSearcher(model)
    whole.add_codes((coarse, fine), ids)
    grown = LOPQSearcher(model)
    for part in thirds(len(X)):
        grown.add_codes((coarse[part], fine[part]), ids[part])
        grown.search_batch(queries[:2], quota=50, limit=5)  # searched between the parts
    assert answers(grown, queries) == answers(whole, queries)
    for q in queries[:5]:
        assert grown.search(q, quota=400, limit=20) == whole.search(q, quota=400, limit=20)


def test_an_index_on_disk_grows_and_shrinks_without_a_rebuild(setup, tmp_path):
    model, X, queries, coarse, fine, ids = setup
    path = tmp_path / "index"
    for k, part in enumerate(thirds(len(X))):
        searcher = LOPQSearcher(model) if k == 0 else LOPQSearcher.load(path)
        searcher.add_codes((coarse[part], fine[part]), ids[part])
        if k == 0:
            searcher.save(path)
        else:
            with pytest.raises(ValueError, match="already holds an index.*overwrite=True"):
                searcher.save(path)
            searcher.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # nothing left over
    grown = LOPQSearcher.load(path)
    whole = LOPQSearcher(model)
    whole.add_codes((coarse, fine), ids)
    assert grown.size == len(X)
    assert answers(grown, queries) == answers(whole, queries)

    # Removing ids (a daily index drops deleted items) answers as an index without them.
    gone = set(ids[::5].tolist()) | {-12345}  # an unknown id is ignored
    assert grown.remove_ids(gone) == len(ids[::5])
    grown.save(path, overwrite=True)
    keep = ~np.isin(ids, ids[::5])
    without = LOPQSearcher(model)
    without.add_codes((coarse[keep], fine[keep]), ids[keep])
    reloaded = LOPQSearcher.load(path)
    assert reloaded.size == keep.sum()
    assert answers(reloaded, queries) == answers(without, queries)
    assert all(i not in gone for ids_q, _ in answers(reloaded, queries) for i in ids_q)


def test_from_codes_reads_several_code_sets_and_globs(setup, tmp_path):
    model, X, queries, coarse, fine, ids = setup
    for k, part in enumerate(thirds(len(X))):
        folder = tmp_path / f"codes-day{k}"
        folder.mkdir()
        (folder / "part-00000").write_text(
            format_code_lines([str(i) for i in ids[part]], coarse[part], fine[part]) + "\n")
    whole = LOPQSearcher(model)
    whole.add_codes((coarse, fine), ids.tolist())
    by_glob = LOPQSearcher.from_codes(model, str(tmp_path / "codes-day*"))
    by_list = LOPQSearcher.from_codes(model, [tmp_path / f"codes-day{k}" for k in range(3)])
    assert answers(by_glob, queries) == answers(whole, queries)
    assert answers(by_list, queries) == answers(whole, queries)
    with pytest.raises(ValueError, match="codes-day9 does not exist"):
        LOPQSearcher.from_codes(model, [tmp_path / "codes-day0", tmp_path / "codes-day9"])


@pytest.mark.spark
def test_spark_search_over_several_code_sets_equals_one(sc, setup, tmp_path, capsys):
    """compute_codes on three days' data with one model, then search.py --codes over the
    three outputs (a comma list, and a glob) gives the answers of codes computed at once."""
    import json
    model, X, queries, _, _, ids = setup
    proto = tmp_path / "model.lopq"
    model.export_proto(str(proto))
    query_file = tmp_path / "queries.txt"
    write_vector_file(query_file, queries)
    sets = []
    for k, part in enumerate(thirds(len(X)) + [slice(0, len(X))]):
        data = tmp_path / f"day{k}.txt"
        write_vector_file(data, X[part], ids=ids[part].tolist())
        out = tmp_path / ("all" if k == 3 else f"codes-day{k}")
        code, (_, err) = run_driver("compute_codes", ["--data", str(data), "--model_proto",
                                                      str(proto), "--output", str(out)],
                                    capsys)
        assert code == 0, err
        sets.append(out)

    def search(codes, name):
        out = tmp_path / name
        code, (_, err) = run_driver("search", [
            "--model_proto", str(proto), "--codes", codes, "--data", str(query_file),
            "--k", "20", "--quota", "400", "--output", str(out)], capsys)
        assert code == 0, err
        return {line.split("\t")[0]: json.loads(line.split("\t")[1])
                for part in sorted(out.glob("part-*")) for line in part.read_text().splitlines()}

    at_once = search(str(sets[3]), "at_once")
    assert search(",".join(str(s) for s in sets[:3]), "listed") == at_once
    assert search(str(tmp_path / "codes-day*"), "globbed") == at_once
    code, (_, err) = run_driver("search", [
        "--model_proto", str(proto), "--codes", f"{sets[0]},{tmp_path / 'nope'}", "--data",
        str(query_file), "--k", "5", "--output", str(tmp_path / "x")], capsys)
    assert code == 2 and "--codes" in err and "nope does not exist" in err, err
