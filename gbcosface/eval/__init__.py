"""Evaluation: pair sets (``verification``), IJB-B/C 1:1 (``ijb``), ROC/TAR@FAR (``roc``),
run comparison (``compare``)."""
