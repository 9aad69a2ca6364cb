"""LOPQ as a ``pyspark.ml`` Estimator and Model, for DataFrames and Pipelines.

    from lopq.spark.ml import LOPQ
    lopq = LOPQ(featuresCol="features", V=16, M=8, seed=1)
    fitted = lopq.fit(df)              # df: array<float>, array<double> or Vector column
    coded = fitted.transform(df)       # + coarse array<int> (2), fine array<int> (M)
    fitted.model                       # the core lopq.LOPQModel
    fitted.save("lopq-model/")         # keeps model.lopq inside the folder

`LOPQ.fit` runs the same training as ``spark/train_model.py`` (`lopq.spark.train_model`
on the same cached blocks), so the same table and seed give the same model; `transform`
encodes Arrow batches with the compiled kernels.

    fitted.approxNearestNeighbors(df, key, 10)           # MLlib LSH's signatures and
    fitted.approxSimilarityJoin(dfA, dfB, 1.5)          # output columns, routed by cells

switch from ``BucketedRandomProjectionLSH`` by changing the estimator (distances are
Euclidean estimates, ``quota`` sets how many codes each search retrieves).
"""

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasSeed
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsReader,
    DefaultParamsWritable,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)

from ..metric import check_metric, model_dimension
from ..model import LOPQModel
from ..training import ROTATION_SHRINKAGE, check_shrinkage
from .metric import blocks_for_metric

#: The file that holds the core model inside a saved LOPQSparkModel folder.
MODEL_FILE = "model.lopq"


def _to_shrinkage(value):
    """Param converter: ``"auto"`` or a float >= 0 (TypeError otherwise, as Spark's)."""
    try:
        return check_shrinkage(value)
    except ValueError as err:
        raise TypeError(str(err)) from None


class _LOPQParams(HasFeaturesCol, HasSeed):
    V = Param(Params._dummy(), "V", "coarse clusters per split (V^2 cells)",
              typeConverter=TypeConverters.toInt)
    M = Param(Params._dummy(), "M", "subquantizers (bytes per code when S <= 256); even, "
              "divides the dimension", typeConverter=TypeConverters.toInt)
    subquantizerClusters = Param(Params._dummy(), "subquantizerClusters",
                                 "clusters per subquantizer (S)",
                                 typeConverter=TypeConverters.toInt)
    coarseIters = Param(Params._dummy(), "coarseIters",
                        "Lloyd iterations of the coarse k-means", TypeConverters.toInt)
    localIters = Param(Params._dummy(), "localIters",
                       "Lloyd iterations of the subquantizer k-means", TypeConverters.toInt)
    rotationRefinementIters = Param(Params._dummy(), "rotationRefinementIters",
                                    "rounds of local rotation refinement (0: the "
                                    "reference's training)", TypeConverters.toInt)
    rotationShrinkage = Param(Params._dummy(), "rotationShrinkage",
                              "how far each local covariance leans on the pooled one: "
                              "'auto' ('lw', 1.0 or 0, whichever ranks held-out "
                              "rows' neighbours best), 'lw' (per-cluster Ledoit-Wolf), or "
                              "pseudo-rows per dimension (0: the reference)", _to_shrinkage)
    samplingRatio = Param(Params._dummy(), "samplingRatio",
                          "fraction of rows to train on, in (0, 1]", TypeConverters.toFloat)
    subquantizerSamplingRatio = Param(Params._dummy(), "subquantizerSamplingRatio",
                                      "fraction of rows to train the subquantizers on",
                                      TypeConverters.toFloat)
    metric = Param(Params._dummy(), "metric", "what 'nearest' means: 'l2' (squared "
                   "distance), 'cosine' or 'inner_product' (largest dot products first)",
                   TypeConverters.toString)

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(subquantizerClusters=256, coarseIters=10, localIters=20,
                         rotationRefinementIters=3, rotationShrinkage=ROTATION_SHRINKAGE,
                         samplingRatio=1.0,
                         subquantizerSamplingRatio=1.0, metric="l2")

    def getV(self):
        return self.getOrDefault(self.V)

    def getM(self):
        return self.getOrDefault(self.M)

    def getSubquantizerClusters(self):
        return self.getOrDefault(self.subquantizerClusters)

    def getCoarseIters(self):
        return self.getOrDefault(self.coarseIters)

    def getLocalIters(self):
        return self.getOrDefault(self.localIters)

    def getRotationRefinementIters(self):
        return self.getOrDefault(self.rotationRefinementIters)

    def getRotationShrinkage(self):
        return self.getOrDefault(self.rotationShrinkage)

    def getSamplingRatio(self):
        return self.getOrDefault(self.samplingRatio)

    def getSubquantizerSamplingRatio(self):
        return self.getOrDefault(self.subquantizerSamplingRatio)

    def getMetric(self):
        return self.getOrDefault(self.metric)


class LOPQ(Estimator, _LOPQParams, DefaultParamsReadable, DefaultParamsWritable):
    """Estimator: trains an LOPQ model (steps 0, 1, 2) on a DataFrame's vector column."""

    @keyword_only
    def __init__(self, *, featuresCol="features", V=None, M=None, subquantizerClusters=256,
                 coarseIters=10, localIters=20, rotationRefinementIters=3,
                 rotationShrinkage=ROTATION_SHRINKAGE, samplingRatio=1.0,
                 subquantizerSamplingRatio=1.0, seed=None, metric="l2"):
        super().__init__()
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol="features", V=None, M=None, subquantizerClusters=256,
                  coarseIters=10, localIters=20, rotationRefinementIters=3,
                  rotationShrinkage=ROTATION_SHRINKAGE, samplingRatio=1.0,
                  subquantizerSamplingRatio=1.0, seed=None, metric="l2"):
        return self._set(**self._input_kwargs)

    def setFeaturesCol(self, value):
        return self._set(featuresCol=value)

    def setV(self, value):
        return self._set(V=value)

    def setM(self, value):
        return self._set(M=value)

    def setSubquantizerClusters(self, value):
        return self._set(subquantizerClusters=value)

    def setCoarseIters(self, value):
        return self._set(coarseIters=value)

    def setLocalIters(self, value):
        return self._set(localIters=value)

    def setRotationRefinementIters(self, value):
        return self._set(rotationRefinementIters=value)

    def setRotationShrinkage(self, value):
        return self._set(rotationShrinkage=value)

    def setSamplingRatio(self, value):
        return self._set(samplingRatio=value)

    def setSubquantizerSamplingRatio(self, value):
        return self._set(subquantizerSamplingRatio=value)

    def setSeed(self, value):
        return self._set(seed=value)

    def setMetric(self, value):
        return self._set(metric=check_metric(value))

    def _fit(self, dataset):
        from .data import load_frame_blocks
        from .training import train_model
        for param in (self.V, self.M):
            if not self.isDefined(param) or self.getOrDefault(param) is None:
                raise ValueError(f"LOPQ needs {param.name}: LOPQ({param.name}=...)")
        V, M = self.getV(), self.getM()
        ratio = self.getSamplingRatio()
        if not 0.0 < ratio <= 1.0 or not 0.0 < self.getSubquantizerSamplingRatio() <= 1.0:
            raise ValueError("samplingRatio and subquantizerSamplingRatio must be in (0, 1]")
        seed = self.getOrDefault(self.seed) if self.isDefined(self.seed) else None
        spark = dataset.sparkSession
        metric = check_metric(self.getMetric())
        from .rows import loading_row_folder
        # local mode: the rows are written as row files while they are checked
        blocks, n, D = load_frame_blocks(spark, dataset, self.getFeaturesCol(), None, ratio,
                                         seed, where="the DataFrame",
                                         row_folder=loading_row_folder(spark.sparkContext))
        blocks, largest, dropped = blocks_for_metric(
            spark.sparkContext, blocks, metric, f"column {self.getFeaturesCol()!r}")
        n -= dropped
        if model_dimension(metric, D, M) % 2 or model_dimension(metric, D, M) % M:
            raise ValueError(f"the dimension D={D} of column {self.getFeaturesCol()!r} "
                             f"must be even and divisible by M={M}")
        if V > n:
            raise ValueError(f"V={V} is more than the {n} vectors of the DataFrame")
        model = train_model(spark, blocks, V, M, self.getSubquantizerClusters(), (0, 1, 2),
                            None, seed, self.getSubquantizerSamplingRatio(),
                            self.getCoarseIters(), self.getLocalIters(), 2,
                            self.getRotationRefinementIters(), n,
                            self.getRotationShrinkage(), metric=metric, dim=D,
                            max_norm=largest)
        return self._copyValues(LOPQSparkModel(model))


class LOPQSparkModel(Model, HasFeaturesCol, MLReadable, MLWritable):
    """A fitted LOPQ model: ``transform`` appends ``coarse`` (array<int>, 2 values) and
    ``fine`` (array<int>, M values) columns and keeps every input column.

    Attributes:
        model: the core `lopq.LOPQModel` (export it with ``model.export_proto``).
    """

    coarseCol = Param(Params._dummy(), "coarseCol", "output column of the coarse codes",
                      typeConverter=TypeConverters.toString)
    fineCol = Param(Params._dummy(), "fineCol", "output column of the fine codes",
                    typeConverter=TypeConverters.toString)
    quota = Param(Params._dummy(), "quota", "codes retrieved per query by "
                  "approxNearestNeighbors / approxSimilarityJoin (whole cells, as "
                  "LOPQSearcher.search's quota)", typeConverter=TypeConverters.toInt)

    def __init__(self, model=None):
        super().__init__()
        self.model = model
        self._setDefault(coarseCol="coarse", fineCol="fine", quota=1000)

    def getQuota(self):
        return self.getOrDefault(self.quota)

    def setQuota(self, value):
        return self._set(quota=value)

    def getCoarseCol(self):
        return self.getOrDefault(self.coarseCol)

    def getFineCol(self):
        return self.getOrDefault(self.fineCol)

    def setCoarseCol(self, value):
        return self._set(coarseCol=value)

    def setFineCol(self, value):
        return self._set(fineCol=value)

    def setFeaturesCol(self, value):
        return self._set(featuresCol=value)

    def _transform(self, dataset):
        from .codes import encode_frame
        encoded, _ = encode_frame(dataset, self.model, self.getFeaturesCol(),
                                  coarse_col=self.getCoarseCol(), fine_col=self.getFineCol())
        return encoded

    # ------------------------------------------------ MLlib LSH's search interface
    def _indexed(self, dataset, name):
        """(dataset with a row-number column, cached; its blocks ``(rows, X)``)."""
        from pyspark.sql import functions as F

        from .data import load_frame_blocks
        row_col = "__lopq_row"
        indexed = dataset.withColumn(row_col, F.monotonically_increasing_id()).cache()
        blocks, n, D = load_frame_blocks(indexed.sparkSession, indexed,
                                         self.getFeaturesCol(), row_col,
                                         where=f"approx* {name}", with_ids=True)
        if D != self.model.dim:
            blocks.unpersist()
            indexed.unpersist()
            raise ValueError(f"{name}: column {self.getFeaturesCol()!r} has vectors of "
                             f"dimension {D}, the model is for vectors of dimension "
                             f"{self.model.dim}")
        return indexed, blocks, row_col

    def _codes_of(self, blocks):
        model = self.model

        def run(items):
            for ids, X in items:
                coarse, fine = model.encode(X)
                yield list(ids), coarse.astype(np.int32), fine
        return blocks.mapPartitions(run)

    def approxNearestNeighbors(self, dataset, key, numNearestNeighbors, distCol="distCol"):
        """MLlib ``BucketedRandomProjectionLSHModel.approxNearestNeighbors``: the (at most)
        ``numNearestNeighbors`` rows of ``dataset`` nearest to ``key`` (a Vector or
        array of D numbers), with every input column and ``distCol``: for an L2 model the
        Euclidean distance estimate, ``sqrt`` of the LOPQ distance; for cosine and inner
        product the distance of the metric (1 - cosine, minus the dot product); searched as
        `LOPQSearcher.search(key, quota, limit)` with this model's ``quota``."""
        from pyspark.sql import functions as F

        from .search import ShardedIndex
        k = int(numNearestNeighbors)
        if k <= 0:
            raise ValueError(f"numNearestNeighbors must be positive, got {k}")
        x = np.asarray(key.toArray() if hasattr(key, "toArray") else key, dtype=np.float32)
        if x.shape != (self.model.dim,):
            raise ValueError(f"key has shape {x.shape}, the model is for vectors of "
                             f"dimension {self.model.dim}")
        indexed, blocks, row_col = self._indexed(dataset, "dataset")
        sc = indexed.sparkSession.sparkContext
        try:
            queries = sc.parallelize([(["key"], x[None, :])], 1)
            index = ShardedIndex(sc, self.model, self._codes_of(blocks))
            found = index.search(queries, k, self.getQuota()).collect()
            index.unpersist()
            rows = [(int(r), float(self._reported(d))) for _, (dists, ids) in found
                    for r, d in zip(ids, dists)]
            spark = indexed.sparkSession
            near = spark.createDataFrame(rows, f"{row_col} long, {distCol} double")
            return (indexed.join(F.broadcast(near), row_col).drop(row_col)
                    .orderBy(distCol).localCheckpoint())
        finally:
            blocks.unpersist()
            indexed.unpersist()

    def approxSimilarityJoin(self, datasetA, datasetB, threshold, distCol="distCol"):
        """MLlib ``BucketedRandomProjectionLSHModel.approxSimilarityJoin``: pairs of rows
        of ``datasetA`` and ``datasetB`` whose distance estimate is below ``threshold``
        (L2: Euclidean, ``sqrt`` of the LOPQ distance; cosine: 1 - cosine; inner product:
        minus the dot product, so a negative threshold asks for dot products above
        ``-threshold``), as columns ``datasetA`` and ``datasetB``
        (structs of every input column) and ``distCol``. ``datasetB`` is encoded and
        indexed; each row of ``datasetA`` searches it with this model's ``quota`` (so
        the pairs are those within the threshold among the retrieved codes)."""
        from pyspark.sql import functions as F

        from .search import ShardedIndex
        threshold = float(threshold)
        if threshold != threshold or (self.model.metric != "inner_product"
                                      and not threshold > 0):
            raise ValueError(f"threshold must be positive, got {threshold}")
        l2 = self.model.metric == "l2"
        reported = self._reported
        a, a_blocks, row_col = self._indexed(datasetA, "datasetA")
        b, b_blocks, _ = self._indexed(datasetB, "datasetB")
        sc = a.sparkSession.sparkContext
        try:
            index = ShardedIndex(sc, self.model, self._codes_of(b_blocks))
            found = index.search(a_blocks, self.getQuota(), self.getQuota(),
                                 max_distance=threshold ** 2 if l2 else threshold)
            # Per pair: the join's result is a DataFrame, made from one tuple per pair
            pairs = found.flatMap(lambda kv: [(int(kv[0]), int(other), float(reported(d)))
                                              for other, d in zip(kv[1][1], kv[1][0])
                                              if reported(d) < threshold])
            spark = a.sparkSession
            pair_df = spark.createDataFrame(pairs, f"__lopq_a long, __lopq_b long, "
                                                   f"{distCol} double")
            a_struct = a.select(F.col(row_col).alias("__lopq_a"), F.struct(
                *[F.col(c) for c in datasetA.columns]).alias("datasetA"))
            b_struct = b.select(F.col(row_col).alias("__lopq_b"), F.struct(
                *[F.col(c) for c in datasetB.columns]).alias("datasetB"))
            joined = (pair_df.join(a_struct, "__lopq_a").join(b_struct, "__lopq_b")
                      .select("datasetA", "datasetB", distCol).localCheckpoint())
            index.unpersist()
            return joined
        finally:
            a_blocks.unpersist()
            b_blocks.unpersist()
            a.unpersist()
            b.unpersist()

    @property
    def _reported(self):
        """LOPQ distance -> the distCol value (L2: Euclidean, as MLlib's LSH)."""
        return np.sqrt if self.model.metric == "l2" else float

    def copy(self, extra=None):
        copied = super().copy(extra)
        copied.model = self.model
        return copied

    def write(self):
        return _ModelWriter(self)

    @classmethod
    def read(cls):
        return _ModelReader(cls)

    def __repr__(self):
        return f"LOPQSparkModel({self.model!r})"


class _ModelWriter(MLWriter):
    def __init__(self, instance):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path):
        from . import fs
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sc)
        fs.write_bytes(self.sc, f"{path.rstrip('/')}/{MODEL_FILE}",
                       self.instance.model.to_proto_bytes(), overwrite=True)


class _ModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path):
        from . import fs
        metadata = DefaultParamsReader.loadMetadata(path, self.sc)
        model_path = f"{path.rstrip('/')}/{MODEL_FILE}"
        model = LOPQModel.from_proto_bytes(fs.read_bytes(self.sc, model_path), model_path)
        instance = self.cls(model)
        DefaultParamsReader.getAndSetParams(instance, metadata)
        instance._resetUid(metadata["uid"])
        return instance
