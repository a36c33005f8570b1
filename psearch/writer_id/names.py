"""Names the built-in objective shares with the command line and the reports (no imports)."""

MODEL_CHOICES = ("small", "convnext", "vit")
# What a trial of the built-in objective measures (metrics.json keys and trial user attributes).
METRIC_KEYS = ("val_page_top1", "val_page_top5", "val_page_map", "val_line_acc",
               "val_page_cls_acc")
TRIAL_RESULT_KEYS = (*METRIC_KEYS, "best_epoch", "epochs_run")
# A trial folder's resume checkpoint: read by a rerun of an interrupted trial, removed by the
# worker once the trial has ended for good (unless --keep_last).
RESUME_CHECKPOINT = "last.pth"
