"""Example data UDF: ship with ``--py-files spark/example_udf.py`` and pass
``--data_udf example_udf``.

A UDF has the signature ``udf(sc, data_path, sampling_ratio, seed)`` and returns an RDD of
numpy arrays (training, PCA) or of ``(id, array)`` pairs (compute_codes). This one reads
the default text format (``id<TAB>base64(pickle(ndarray))``) and, when the environment
variable ``LOPQ_PCA_PARAMS`` names a pickle from pca_preparation.py (shipped with
``--files``), projects each vector with it. Set ``LOPQ_UDF_WITH_IDS=1`` for compute_codes.
"""

import os

from lopq.formats import decode_vector_line, safe_load_pickle


def udf(sc, data_path, sampling_ratio, seed):
    with_ids = os.environ.get("LOPQ_UDF_WITH_IDS") == "1"
    pca_path = os.environ.get("LOPQ_PCA_PARAMS")
    pca_bc = None
    if pca_path:
        from lopq.spark import fs
        pca_bc = sc.broadcast(safe_load_pickle(fs.read_bytes(sc, pca_path),
                                                "a PCA parameter pickle"))

    lines = sc.textFile(data_path, minPartitions=sc.defaultParallelism)
    if sampling_ratio < 1.0:
        lines = lines.sample(False, sampling_ratio, seed)

    def decode(line):
        key, vector = decode_vector_line(line)
        if pca_bc is not None:
            from lopq.spark.training import apply_pca
            vector = apply_pca(vector[None, :], pca_bc.value)[0]
        return (key, vector) if with_ids else vector

    return lines.map(decode)
