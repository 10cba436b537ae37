"""The accuracy-matrix heatmap: the start row and the change-from-own-score panel (diverging, centred at 0).

Checked by breaking the code on purpose: subtracting ``R[i][i]`` (the row's diagonal) instead of ``R[j][j]``
fails the hand values; dropping the mask or the ``TwoSlopeNorm`` centre fails the figure test.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from hf_continual.report import forgetting_deltas, heatmap_figure, plot_heatmap

matplotlib.use("Agg")

TASKS = ["a", "b", "c"]
R = [[0.75, 0.25, 0.5], [0.5, 1.0, 0.5], [0.625, 0.75, 0.875]]
B = [0.5, 0.25, 0.125]


def test_forgetting_deltas_hand_computed():
    # own scores R[j][j] = 0.75, 1.0, 0.875; all values dyadic, so the differences are exact
    assert forgetting_deltas(R) == [[0.0, -0.75, -0.375], [-0.25, 0.0, -0.375], [-0.125, -0.25, 0.0]]
    assert forgetting_deltas(R, B)[0] == [-0.25, -0.75, -0.75]
    assert forgetting_deltas(R, B)[1:] == forgetting_deltas(R)


def test_figure_has_scores_with_start_row_and_centred_change_panel():
    fig = heatmap_figure(TASKS, R, "t", "acc", initial=B)
    try:
        scores, change = fig.axes[0].images[0], fig.axes[1].images[0]
        np.testing.assert_array_equal(scores.get_array(), 100 * np.asarray([B, *R]))
        delta = change.get_array()
        # the start row and the cells above the diagonal (task not trained yet) are masked (drawn grey)
        expected_mask = [[True] * 3, [False, True, True], [False, False, True], [False, False, False]]
        np.testing.assert_array_equal(np.ma.getmaskarray(delta), expected_mask)
        np.testing.assert_allclose(delta[3].data, [-12.5, -25.0, 0.0], atol=1e-9)  # float x100
        norm = change.norm
        assert norm.vcenter == 0.0 and norm.vmin == -norm.vmax == -25.0  # largest change after training
        assert change.get_cmap().name.startswith("RdBu")
        labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert labels == ["start", "after a", "after b", "after c"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    shared = heatmap_figure(TASKS, R, delta_range=0.5)
    assert shared.axes[1].images[0].norm.vmax == pytest.approx(50.0)  # one scale for compared plots
    import matplotlib.pyplot as plt

    plt.close(shared)


def test_plot_heatmap_writes_png_atomically(tmp_path):
    path = tmp_path / "sub" / "m.png"
    plot_heatmap(TASKS, R, path, "t", "acc", initial=B)
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 1.5 * height  # two panels side by side
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]


def test_stream_reading_states_own_gains_and_end_losses_hand_computed():
    """Own gain = R[j][j] minus the score just before training task j (b[0] for the first task, else R[j-1][j]:
    the start score b[j] would mix in what the earlier tasks did); loss by the end = R[T-1][j] - R[j][j] for
    every task but the last."""
    from hf_continual.report import stream_reading

    results = {
        "none": {
            "tasks": ["a", "b"],
            "initial": [0.80, 0.60],
            "accuracy_matrix": [[0.85, 0.55], [0.78, 0.70]],
        },
        "kfac": {
            "tasks": ["a", "b"],
            "initial": [0.80, 0.60],
            "accuracy_matrix": [[0.85, 0.55], [0.85, 0.66]],
        },
    }
    text = stream_reading(results)
    assert "none: own training: a 80.0 -> 85.0 (+5.0), b 55.0 -> 70.0 (+15.0)" in text
    assert "by the end of the stream: a 85.0 -> 78.0 (-7.0)" in text
    assert "kfac: own training: a 80.0 -> 85.0 (+5.0), b 55.0 -> 66.0 (+11.0)" in text
    assert "a 85.0 -> 85.0 (+0.0)" in text
    assert text.count("by the end") == 2
