"""The persistence part of `lopq.search.LOPQSearcher`: an index directory on disk.

``save`` writes ``index.json`` (format, version, V, M, D, size, dtypes), the model as
``model.lopq`` and the arrays of `lopq.index.CellIndex` as ``.npy`` files (ids as
``ids.npy`` when they are integers, else ``ids.pkl``, read back with the restricted
unpickler, so opening an index never runs code). ``load`` memory-maps the arrays.
"""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np

from .formats import safe_load_pickle
from .model import LOPQModel

INDEX_FORMAT = "lopq-index"
INDEX_VERSION = 1


class IndexFiles:
    """`save`, `load` and `from_codes` of a searcher (mixed into `LOPQSearcher`)."""

    def save(self, path, overwrite=False):
        """Write the index to directory ``path`` (created).

        A directory that already holds an index is refused unless ``overwrite``: then
        the new index is written beside it and swapped in by renames, so a reader sees
        the old index or the new one, never half of one (an index loaded from ``path``
        with memory-mapped arrays keeps reading the old files until it is dropped).
        Growing a daily index: ``load(path)``, ``add_codes``/``remove_ids``,
        ``save(path, overwrite=True)``.
        """
        self._merge_pending()
        path = Path(path)
        if (path / "index.json").exists():
            if not overwrite:
                raise ValueError(f"{path} already holds an index: choose another "
                                 "directory, or pass overwrite=True to replace it")
            staging = path.with_name(f".{path.name}.saving")
            old = path.with_name(f".{path.name}.old")
            for leftover in (staging, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            self._write(staging)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
            return
        path.mkdir(parents=True, exist_ok=True)
        self._write(path)

    def _write(self, path):
        path.mkdir(parents=True, exist_ok=True)
        int_ids = self.ids.size == 0 or all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in self.ids)
        self.model.export_proto(str(path / "model.lopq"))
        np.save(path / "cell_offsets.npy", self.cell_offsets)
        np.save(path / "coarse.npy", self.coarse)
        np.save(path / "fine.npy", self.fine)
        if int_ids:
            np.save(path / "ids.npy", self.ids.astype(np.int64))
        else:
            with open(path / "ids.pkl", "wb") as f:
                pickle.dump(list(self.ids), f, protocol=4)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "V": self.model.V,
                "M": self.model.M, "D": self.model.D, "size": int(len(self.ids)),
                "fine_dtype": str(self.fine.dtype), "ids": "int64" if int_ids else "pickle"}
        (path / "index.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path, mmap=True):
        """Open an index written by `save`; with ``mmap`` the arrays stay on disk."""
        path = Path(path)
        try:
            meta = json.loads((path / "index.json").read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not an lopq index directory (index.json: "
                             f"{err})") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}/index.json is not an lopq index of version "
                             f"{INDEX_VERSION}: {meta}")
        mode = "r" if mmap else None
        try:
            model = LOPQModel.load_proto(str(path / "model.lopq"))
            offsets = np.load(path / "cell_offsets.npy", mmap_mode=mode)
            coarse = np.load(path / "coarse.npy", mmap_mode=mode)
            fine = np.load(path / "fine.npy", mmap_mode=mode)
            if meta["ids"] == "int64":
                ids = np.load(path / "ids.npy", mmap_mode=mode)
            else:
                with open(path / "ids.pkl", "rb") as f:
                    ids = np.empty(meta["size"], dtype=object)
                    ids[:] = safe_load_pickle(f.read(), "an index's id list")
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"{path}: the index is truncated or damaged ({err})") from None
        n, V = meta["size"], model.V
        if (offsets.shape != (V * V + 1,) or fine.shape != (n, model.M) or len(ids) != n
                or coarse.shape != (n, 2) or int(offsets[-1]) != n):
            raise ValueError(f"{path}: array shapes do not match index.json (size {n}, "
                             f"V={V}, M={model.M}); the index is truncated or damaged")
        searcher = cls(model)
        searcher.cell_offsets, searcher.coarse, searcher.fine, searcher.ids = (
            offsets, coarse, fine, ids)
        return searcher

    @classmethod
    def from_codes(cls, model, path):
        """Build an index from `compute_codes` output (text part files of
        ``id<TAB>[[c0, c1], [f0, ...]]``) on the local file system, without the original
        vectors. For HDFS/S3 paths, parsed by the executors, see
        `lopq.spark.codes.searcher_from_codes`.

        Args:
            path: a folder of ``part-*`` files or one file; or a glob, or a list of
                these (several code sets of the same model, indexed as one).

        Raises:
            ValueError: naming the file, line and text of a bad line, or part files whose
                codes come from models of different M.
        """
        import glob

        from .formats import merge_code_parts, parse_code_lines
        files = []
        for one in [path] if isinstance(path, (str, Path)) else list(path):
            matches = sorted(glob.glob(str(one))) or [str(one)]
            for match in map(Path, matches):
                if match.is_dir():
                    found = sorted(match.glob("part-*"))
                    if not found:
                        raise ValueError(f"no part files in {match}")
                    files += found
                elif match.exists():
                    files.append(match)
                else:
                    raise ValueError(f"{match} does not exist")
        if not files:
            raise ValueError(f"no part files in {path}")
        parts = [parse_code_lines(f.read_text().splitlines(), str(f)) for f in files]
        ids, coarse, fine = merge_code_parts(parts, path)
        searcher = cls(model)
        searcher.add_codes((coarse, fine), ids)
        return searcher
