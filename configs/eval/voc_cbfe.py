"""Fully unsupervised segmentation on Pascal VOC 2012: CBFE + community detection (Leopart's protocol, as NeCo).

python -m evaluation --config=configs/eval/voc_cbfe.py --config.checkpoint=SOURCE --config.data_dir=DIR \
    --config.workdir=OUT [--config.cbfe.k_community=149 --config.cbfe.markov_time=2 --config.cbfe.weight_threshold=0.09]

Without the three community-detection values it searches them first (Optuna TPE, as NeCo's script).

Features of VOC train (1,464) + val (1,449) at 448 px; evaluation at 100x100 (reference/evaluation_protocols.md
section 3). Writes results.json / results.txt, cbfe/example_*.png (image, ground truth, matched segments, overlay) and,
after a search, cbfe/search_history.png.
"""

import ml_collections

from configs.eval import base


def cbfe_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.train_split = "train"  # VOC train (1,464 images), for the threshold choice and the co-occurrence graph
    c.image_size = 448
    c.mask_size = 100  # evaluation size of cluster maps, masks and ground truth
    b = c.cbfe = ml_collections.ConfigDict()
    # Standardise + PCA to pca_dim over train + val (faiss PCAMatrix subsample: pca_max_points_per_dim * D vectors).
    b.pca_dim = 50
    b.pca_max_points_per_dim = 1000
    # Noisy foreground from the last block's CLS attention: share of attention mass kept, GaussianBlur size/sigma,
    # and the smallest 8-connected component kept (smaller ones are removed; the reference drops <= 2 patches).
    b.attention_keep = 0.65
    b.blur_size = 7
    b.blur_sigma = 0.6
    b.min_component = 3
    # CBFE: spherical k-means clusters; the background cut tries the lowest cut_range share of clusters.
    b.k_fg = 200
    b.cut_range = (0.55, 0.75)
    # k-means (faiss defaults of the reference): Lloyd iterations, restarts, training subsample per centroid, seed.
    b.kmeans_iters = 100
    b.kmeans_restarts = 5
    b.max_points_per_centroid = 256
    b.seed = 0
    # Community detection: foreground clusters, Infomap Markov time, edge weight threshold. All three 0 (default):
    # found by NeCo's search (below). All three given: used as they are. Or cd_preset="leopart_vits16" (149, 2, 0.09)
    # / "leopart_vitb8" (109, 0.4, 0.07): Leopart's published values (MkuuWaUjinga/leopart README).
    b.k_community = 0
    b.markov_time = 0.0
    b.weight_threshold = 0.0
    b.cd_preset = ""
    # The search (NeCo experiments/fully_unsup_seg/fully_unsup_seg.py): Optuna TPE with this seed and number of
    # trials, maximising the mean CD mIoU on train; ranges (low, high, step) as NeCo's script.
    b.search_trials = 300
    b.search_seed = 1000
    b.search_weight_threshold = (0.01, 0.1, 0.01)
    b.search_markov_time = (0.1, 2.0, 0.1)
    b.search_k = (69, 249, 10)
    # Infomap runs (results averaged) and its preferred number of modules (VOC object classes).
    b.num_runs = 10
    b.num_objects = 20
    # Also score CBFE alone (num_objects foreground clusters, cbfe_seeds k-means seeds, Hungarian), as NeCo does.
    b.evaluate_cbfe = True
    b.cbfe_seeds = 5
    # Switches to reproduce the original where it differs from the default:
    # folder with the original's precomputed noisy masks attn_train.pt / attn_val.pt ("" = the evaluated model's
    # own CLS attention);
    b.attention_dir = ""
    # False builds the model without register tokens, as NeCo's script does (True = the model as loaded);
    b.registers = True
    # also report the original's compute_upper_bound (fine clusters matched many-to-one by precision).
    b.compute_upper_bound = False
    return c


def get_config():
    c = base.common_fields("voc", "cbfe")
    cbfe_fields(c)
    c.lock()
    return c
