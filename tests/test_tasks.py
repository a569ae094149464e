"""Each task loader on its real bundled data."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from braid_ray.config import load_config
from braid_ray.data.encoding import decode, reverse_complement, to_index
from braid_ray.config import TaskConfig
from braid_ray.data.tasks import ASSETS, get_task

SIX6 = ASSETS / "tfbind8_six6"


def _task(*overrides: str):
    return get_task(load_config(None, list(overrides)).task)


@pytest.fixture(scope="module")
def tfbind8():
    return _task("task.name=tfbind8").load()


def test_tfbind8_covers_every_8mer_once_with_both_strands(tfbind8) -> None:
    assert len(tfbind8) == 4**8 and tfbind8.length == 8
    assert np.unique(to_index(tfbind8.codes)).size == 4**8
    assert tfbind8.y.min() == 0.0 and tfbind8.y.max() == 1.0
    # Both strands carry the same label.
    lookup = np.empty(4**8)
    lookup[to_index(tfbind8.codes)] = tfbind8.y
    np.testing.assert_array_equal(lookup[to_index(reverse_complement(tfbind8.codes))], tfbind8.y)
    best = decode(tfbind8.codes[[np.argmax(tfbind8.y)]])[0]
    assert best in ("AGGTATCA", "TGATACCT")


def test_tfbind8_matches_design_bench_normalisation(tfbind8) -> None:
    """design-bench's TFBind8 shard (x: both strands stacked, y: min-max E-score) equals our table."""
    x = np.load(SIX6 / "tf_bind_8-x-0.npy")
    y = np.load(SIX6 / "tf_bind_8-y-0.npy")[:, 0]
    lookup = np.full(4**8, np.nan)
    lookup[to_index(tfbind8.codes)] = tfbind8.y
    np.testing.assert_allclose(lookup[to_index(x)], y, atol=1e-6)


def test_tfbind8_accepts_a_gzipped_uniprobe_table_and_rejects_bad_ones(tmp_path: Path, tfbind8) -> None:
    gz = tmp_path / "MY_TF_8mers.txt.gz"
    with open(SIX6 / "SIX6_REF_R1_8mers.txt", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    d = _task("task.name=tfbind8", f"task.path={gz}").load()
    np.testing.assert_array_equal(d.codes, tfbind8.codes)
    np.testing.assert_allclose(d.y, tfbind8.y)

    lines = (SIX6 / "SIX6_REF_R1_8mers.txt").read_text().splitlines()
    bad_header = tmp_path / "h.txt"
    bad_header.write_text("\n".join(["kmer\tE-score"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="h.txt line 1: expected the UniPROBE 8-mer layout"):
        _task("task.name=tfbind8", f"task.path={bad_header}").load()
    swapped = lines[:]
    a, b, *rest = swapped[5].split("\t")
    swapped[5] = "\t".join([a, a, *rest])  # second column no longer the reverse complement
    assert a != b
    bad_rc = tmp_path / "rc.txt"
    bad_rc.write_text("\n".join(swapped) + "\n")
    with pytest.raises(ValueError, match="rc.txt line 6: the second 8-mer is not the reverse complement"):
        _task("task.name=tfbind8", f"task.path={bad_rc}").load()
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(lines[:1000]) + "\n")
    with pytest.raises(ValueError, match=r"covers \d+ of the 65,536 8-mers"):
        _task("task.name=tfbind8", f"task.path={partial}").load()


def test_utr_mrl_bundled_tables() -> None:
    ci = _task("task.name=utr_mrl", "task.subset=ci").load()
    assert len(ci) == 2000 and ci.length == 50
    assert decode(ci.codes[:1])[0] == "CCACTCGATTAACATGTTAACAACATACTCGTCCGGCCGATCAGCGGCTA"
    assert ci.y[0] == pytest.approx(3.039939)
    full = _task("task.name=utr_mrl").load()
    assert len(full) == 280_000 and full.y.min() == 0.0 and full.y.max() == 12.0


def test_dhs_label_is_signal_in_the_target_cell_type_only() -> None:
    hepg2 = _task("task.name=dhs").load()
    k562 = _task("task.name=dhs", "task.cell_type=K562").load()
    assert len(hepg2) == len(k562) == 47_872 and hepg2.length == 200
    # Each cell type owns a quarter of the DHSs; the label is positive only there.
    assert (hepg2.y > 0).sum() == (k562.y > 0).sum() == 11_968
    assert not ((hepg2.y > 0) & (k562.y > 0)).any()
    assert hepg2.y.max() <= np.log1p(5715.8) + 1e-6


def test_tfbind5_is_the_mean_of_each_prefix_over_the_8mer_table() -> None:
    from braid_ray.data.encoding import to_index

    d8 = get_task(TaskConfig(name="tfbind8")).load()
    d5 = get_task(TaskConfig(name="tfbind5")).load()
    assert d5.codes.shape == (1024, 5) and np.unique(to_index(d5.codes)).size == 1024
    for row in (0, 417, 1023):  # a prefix's value is the mean of its 64 extensions
        prefix = (d8.codes[:, :5] == d5.codes[row]).all(axis=1)
        assert prefix.sum() == 64
        assert d5.y[row] == pytest.approx(d8.y[prefix].mean(), rel=1e-12)
