"""The paper's numbers, in one place: *Learning with Local Gradients at the Edge* (Lomnitz et al., 2022).

Accuracies in %, as ``(mean, std)`` over the paper's 25 restarts (TensorFlow on an RTX A5000 GPU), times in s.
The benchmark scripts and ``benchmarks/report.py`` read them from here.
"""

#: Table 2 (2-layer MLP on MNIST): method -> (accuracy, its std, training time, its std).
TABLE2: dict[str, tuple[float, float, float, float]] = {
    "zorb": (89.4, 0.22, 7.9, 0.39),
    "lm_karnet": (89.9, 0.12, 4.9, 0.38),
    "tpsgd-l2": (88.3, 0.25, 1.7, 0.01),
}
TABLE2_CLAIM = "tpSGD 4.6× / 2.9× faster, 1–2 points less accurate"

#: Table 3 (the shallow CNN) and Table 2's tpSGD row: (dataset, model) -> method -> (accuracy, std, time).
TABLE3: dict[tuple[str, str], dict[str, tuple[float, float | None, float | None]]] = {
    ("mnist", "mlp2"): {"tpsgd": (88.3, 0.25, 1.7)},
    ("mnist", "cnn2"): {"tpsgd": (96.6, 0.2, 2.7), "bp": (97.1, 0.21, 2.3)},
    ("cifar10", "cnn2"): {"tpsgd": (46.5, 1.2, 4.6), "bp": (46.8, 1.1, 4.8)},
}

#: Table 4: row -> (accuracy, std, trained size in the paper's MB). VGG11 from scratch on Imagenette, and the
#: adaptors / transfer learning on a frozen VGG16 backbone at 320 px.
TABLE4: dict[str, tuple[float, float, float]] = {
    "vgg11/tpsgd": (64, 3.1, 180),
    "vgg11/bp": (78, 1.4, 180),
    "adaptor/tpsgd": (83, 0.95, 6),
    "adaptor/bp": (88, 1.7, 6),
    "transfer": (87, 1.3, 492),
}

#: Tables 5, 7 and 8 (recurrent networks): (table, dataset) -> accuracy of the columns random, random RNN +
#: classifier, RNN (DRTP) + classifier, RNN (tpSGD-ℓ1) + classifier, BP. UCF101 and Twitter (Word2Vec) are left
#: out: their pre-extracted features are not available offline.
RNN_COLUMNS = ("random", "random_rnn", "drtp", "l1", "bp")
_RNN = """
5 rows 9.58 9.76 83.39 79.81 92.53 | 5 pixels 10.28 11.35 62.83 66.46 75.55 | 5 eeg 48.35 79.48 89.57 83.57 94.14
5 twitter 49.92 50.08 66.82 67.72 71.75 | 7 rows 10.32 19.02 83.16 79.96 92.59 | 7 pixels 10.32 13.66 68.60 70.01 82.04
7 eeg 51.57 80.87 80.78 80.87 93.75 | 7 twitter 50.08 52.55 67.04 67.35 69.94 | 8 rows 11.35 10.70 83.13 79.05 92.10
8 pixels 11.35 10.32 67.19 68.01 80.95 | 8 eeg 48.52 85.04 84.09 88.61 90.53 | 8 twitter 50.08 51.07 65.00 66.41 71.65
"""
RNN: dict[tuple[str, str], tuple[float, ...]] = {
    (t, d): tuple(map(float, values))
    for t, d, *values in (row.split() for row in _RNN.replace("\n", "|").split("|") if row.strip())
}

#: Figures 3 and 4 print no numbers; what the text says about them.
FIGURE3 = (
    '§2.4: "the basic sampling shows little to no improvements as the number of filters in the layer increases, '
    'filter based sampling projections show steady improvement, albeit with diminishing returns."'
)
FIGURE4 = (
    "Appendix A: for n_hidden = 0, tpSGD is within 3–5 % of Adam as n_conv grows; at the deepest networks (upper "
    "right) the gap is 10–15 %, because added Linear layers help tpSGD less than Adam."
)


def fmt(mean: float, std: float | None = None, unit: str = "") -> str:
    """A paper number as the paper prints it: ``"89.4 (0.22)"``."""
    return f"{mean:g}{unit}" + (f" ({std:g})" if std is not None else "")
