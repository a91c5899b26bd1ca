"""benchmarks/scan_bench.py: rounds of --repeat and the table of their spread."""

import pytest

from benchmarks.scan_bench import Row, main, print_spread


def test_spread_table_gives_each_rows_median_and_range_over_rounds(capsys):
    def row(impl, fwd, fwd_vjp, bwd, fb, note=""):
        return Row((2, 8, 4, 2), "float32", impl, fwd_us=fwd, fwd_vjp_us=fwd_vjp, bwd_us=bwd,
                   fb_us=fb, note=note)

    rows = [row("pallas", 10.0, 11.0, 30.0, 40.0, note="time_splits=5"),
            row("sequential", 7.0, 8.0, None, 9.0),
            row("pallas", 14.0, 16.0, 20.0, 50.0, note="time_splits=5"),
            row("sequential", 5.0, 6.0, None, 11.0),
            row("pallas", 12.0, 19.0, 25.0, 60.0, note="time_splits=5")]
    print_spread(rows, 3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == ("| (2, 8, 4, 2) | float32 | pallas (time_splits=5) | 12 (10-14) | "
                         "16 (11-19) | 25 (20-30) | 50 (40-60) | 3 |")
    assert lines[-1] == ("| (2, 8, 4, 2) | float32 | sequential | 6 (5-7) | 7 (6-8) | - | "
                         "10 (9-11) | 2 |")


def test_repeat_times_the_whole_list_in_rounds(capsys):
    rows = main(["--quick", "--impls", "sequential,associative", "--dtypes", "float32",
                 "--shapes", "1", "--repeat", "2", "--budget", "0.01"])
    assert [r.impl for r in rows] == ["sequential", "associative"] * 2
    assert all(r.fwd_us and r.fwd_vjp_us and r.bwd_us and r.fb_us and r.fwd_floor_us
               for r in rows)
    out = capsys.readouterr().out
    assert "median (min-max) over 2 rounds, us" in out
    assert out.count("| 2 |") == 2


def test_repeat_must_be_positive():
    with pytest.raises(SystemExit):
        main(["--quick", "--repeat", "0"])


def test_forward_saving_returns_only_the_residuals_it_computes():
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from benchmarks.scan_bench import forward_saving  # noqa: PLC0415

    x, w = jnp.arange(3.0), jnp.float32(2.0)

    def f(x, w):
        return jnp.sin(x) * w

    y, saved = forward_saving(f, x, w)
    assert jnp.allclose(y, jnp.sin(x) * w)
    # The product's vjp keeps w (an input: left out) and sin(x), sin's keeps cos(x).
    everything = jax.tree.leaves(jax.vjp(f, x, w)[1])
    assert any(r is w for r in everything) and len(saved) == len(everything) - 1
    assert sorted(float(r.sum()) for r in saved) == sorted(
        float(v.sum()) for v in (jnp.sin(x), jnp.cos(x)))
