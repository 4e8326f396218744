"""The column names of the index and of the scores: the one leaf every stage reads them from.

The index needs one column, ``path`` (a local path or a pyarrow-filesystem URI such as ``s3://bucket/a.png``).
Optional: ``label`` (0 normal, 1 anomalous), ``split`` (fit keeps ``"train"`` rows when the column exists), and any
other column, carried unchanged into the scores.
"""

PATH_COL = "path"
LABEL_COL = "label"
SPLIT_COL = "split"
DEFECT_COL = "defect_type"  # optional index column: the kind of defect (``good`` for normal images)
MASK_COL = "mask_path"  # optional index column: the defect's ground-truth mask (pixel metrics)
ROW_COL = "row_index"  # position of the row in the index; the key of every output row
IMAGE_COL = "image"
ERROR_COL = "error"
SCORE_COL = "anomaly_score"
PROB_COL = "anomaly_probability"
HEIGHT_COL = "image_height"  # original image size, pixels
WIDTH_COL = "image_width"
MAP_COL = "anomaly_map"  # DFM: pooled-resolution map, flattened row-major
MAP_SHAPE_COL = "anomaly_map_shape"
NUM_REGIONS_COL = "num_regions"  # RKDE: regions per image, their boxes (original pixels) and probabilities
BOXES_COL = "boxes"
BOX_SCORES_COL = "box_scores"
DECISION_COL = "is_anomalous"  # anomaly_score >= the model's threshold (rayanom.decisions)
NORMALIZED_COL = "normalized_score"  # anomalib's min-max normalisation around the threshold
RESERVED_COLS = (ROW_COL, IMAGE_COL, ERROR_COL, SCORE_COL, PROB_COL, HEIGHT_COL, WIDTH_COL, MAP_COL, MAP_SHAPE_COL,
                 NUM_REGIONS_COL, BOXES_COL, BOX_SCORES_COL, DECISION_COL, NORMALIZED_COL)
