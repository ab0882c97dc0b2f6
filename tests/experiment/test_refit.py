"""docs/refit_choices.py refits the analysis from an exported choices.csv alone, and gets the same numbers.

This is the promise of docs/analysis.md: a researcher with only the export (and numpy, pandas, statsmodels)
reproduces the estimates, the group-clustered standard errors (CR1, and CR2 with its degrees of freedom) and
the score bootstrap p-value.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from experiment import analysis
from experiment.export import Scope
from experiment.models import Choice, Group, Participant
from tests.experiment.test_analysis import plant

pytestmark = pytest.mark.django_db
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "refit_choices.py"


def _script():
    spec = importlib.util.spec_from_file_location("refit_choices", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_export_alone_refits_the_analysis(tmp_path: Path) -> None:
    session = plant()
    Group.objects.filter(session=session, number__gt=14).delete()  # 14 groups: the score bootstrap is the default
    # A choice a scripted bot made in a person's seat after a takeover is not a human preference.
    taken = Choice.objects.filter(group__session=session, timed_out=False).order_by("id").first()
    Choice.objects.filter(pk=taken.pk).update(decided_by=Participant.Controller.SCRIPTED)
    scope = Scope.session(session.pk)
    fit = analysis.regression(scope=scope)
    assert not fit.error and fit.method == "cr2" and fit.n_clusters == 14

    call_command("export", session=session.pk, out=tmp_path, unzipped=True, stdout=sys.stderr)
    (choices,) = tmp_path.rglob("choices.csv")
    with choices.open() as f:
        counted = {int(r["choice_id"]) for r in csv.DictReader(f) if r["counted"] == "True"}
    assert counted == set(analysis.counted_choices(scope=scope).values_list("id", flat=True))
    assert taken.pk not in counted and len(counted) == fit.n

    out = _script().main([str(choices), "--draws", str(analysis.BOOTSTRAP_DRAWS), "--seed", str(analysis.BOOTSTRAP_SEED)])
    crve = analysis.regression(scope=scope, inference="crve")
    boot = analysis.fit_regression(frame=analysis.choice_frame(scope=scope), inference="bootstrap", intervals=False,
                                   describe=False)
    for c, c1 in zip(fit.coefficients, crve.coefficients, strict=True):
        assert out[f"estimate:{c['term']}"] == pytest.approx(c["estimate"], rel=1e-6)
        assert out[f"se_cr2:{c['term']}"] == pytest.approx(c["se"], rel=1e-6)
        assert out[f"df_cr2:{c['term']}"] == pytest.approx(c["df"], rel=1e-6)
        assert out[f"p_cr2:{c['term']}"] == pytest.approx(c["p"], rel=1e-6)
        assert out[f"se:{c['term']}"] == pytest.approx(c1["se"], rel=1e-6)
        assert out[f"p:{c['term']}"] == pytest.approx(c1["p"], rel=1e-6)
    assert out["p_boot:round:disclosed"] == pytest.approx(boot.differences[0].p, abs=1e-9)


def test_the_script_runs_without_partnerlab(tmp_path: Path) -> None:
    """Standalone: run from a directory outside the project, with no Django settings."""
    session = plant()
    Group.objects.filter(session=session, number__gt=8).delete()
    call_command("export", session=session.pk, out=tmp_path / "x", unzipped=True, stdout=sys.stderr)
    (choices,) = (tmp_path / "x").rglob("choices.csv")
    result = subprocess.run([sys.executable, str(SCRIPT), str(choices), "--draws", "199"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
    assert "8 groups" in result.stdout and "round:disclosed" in result.stdout and "score bootstrap p" in result.stdout
