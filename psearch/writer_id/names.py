"""Names the built-in objective shares with the command line and the reports (no imports)."""

MODEL_CHOICES = ("small", "convnext", "vit")
# What a trial of the built-in objective measures (metrics.json keys and trial user attributes).
METRIC_KEYS = ("val_page_top1", "val_page_top5", "val_page_map", "val_line_acc",
               "val_page_cls_acc")
# The trial value's 95% interval from resampling the validation pages (trial_value.py).
INTERVAL_KEYS = ("value_low", "value_high")
TRIAL_RESULT_KEYS = (*METRIC_KEYS, *INTERVAL_KEYS, "best_epoch", "epochs_run")
# How a trial's value is read off its validation curve (trial_value.DEFINITIONS has them): the
# default was chosen by bench/trial_value.py; a study made before there was a choice used LEGACY.
TRIAL_VALUES = ("map_smooth3", "mix_smooth3", "top1_smooth3", "map_last3", "map_best",
                "top1_best")
DEFAULT_TRIAL_VALUE = "map_smooth3"
LEGACY_TRIAL_VALUE = "top1_best"
# A trial folder's resume checkpoint: read by a rerun of an interrupted trial, removed by the
# worker once the trial has ended for good (unless --keep_last).
RESUME_CHECKPOINT = "last.pth"
# The hyperparameters a trial of the built-in objective takes (a search space may set these only;
# default_space.yaml searches them all, search_space.DEFAULTS holds a value for each).
PARAMETERS = ("model_type", "lr", "weight_decay", "dropout", "drop_path", "embedding_dim",
              "freeze", "loss", "label_smoothing", "mixup_alpha", "focal_gamma", "use_triplet",
              "triplet_weight", "triplet_margin", "warmup_epochs", "grad_clip")
