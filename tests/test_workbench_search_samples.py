"""The Search tab's merge method and sample generations, through the session (no browser): the form's values reach the
SearchSpec and the search, each trial stores its generations, and the history chart carries them for hover and click.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from test_workbench_session import SUITE, tiny_workdir

from optimer_lib.search import record
from workbench.figures import study_figures
from workbench.searching import ParetoRun, SearchSpec, load_study
from workbench.session import Session
from workbench.tabs.search import SearchTab, samples_md, with_samples
from workbench.workspace import WorkbenchError, Workspace

PROMPTS = "the quick\n12 + 35 ="


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE), tune_limit=3, qa_limit=2)


def _form(method: str, params: str, name: str, prompts: str = PROMPTS) -> SearchSpec:
    # the Search tab's form, in the order of its inputs (kind, preset, spec, sampler, trials, bounds, seed, ...)
    return SearchTab._spec("preset", "balanced", "", "random", 3, "0:1", 7, 2, 0, 2, name, 0.0, "", method, params,
                           prompts, 5)


def test_method_and_samples_reach_the_search(session: Session):
    spec = _form("ties", "density=0.5", "ties-run")
    assert (spec.method, spec.method_params, spec.sample_tokens) == ("ties", "density=0.5", 5)
    runs = {}
    for method, params, name in (("ties", "density=0.5", "ties-run"), ("optimer", "", "lin-run")):
        run = session.start_search(_form(method, params, name))
        assert run.wait(120) and run.error is None, run.error
        runs[method] = run
    assert runs["ties"].method_params == {"density": 0.5} and runs["ties"].config.sample_tokens == 5
    studies = {m: load_study(session.workspace.storage_url, r.study_name) for m, r in runs.items()}
    done = {m: s.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) for m, s in studies.items()}
    # same seed, same sampler: the same weights, scored on differently merged models
    assert [t.params for t in done["ties"]] == [t.params for t in done["optimer"]]
    assert all(a.value != b.value for a, b in zip(done["ties"], done["optimer"], strict=True))
    for t in done["ties"]:
        assert [s["prompt"] for s in record.trial_samples(t)] == PROMPTS.splitlines()
        assert 0 < t.user_attrs[record.TOKENS_GENERATED] <= 10

    study = studies["ties"]
    fig = with_samples(study_figures(study)[0], study)
    marked = next(tr for tr in fig.data if tr.name == "Objective Value")
    assert [cd[0] for cd in marked.customdata] == [t.number for t in done["ties"]]
    first = record.trial_samples(done["ties"][0])
    assert " ".join(first[0]["text"].split())[:20] in marked.customdata[0][1]
    md = samples_md(study, done["ties"][0].number)
    assert f"trial {done['ties'][0].number}" in md and all(s["prompt"] in md for s in first)
    assert "no trial 99" in samples_md(study, 99)


def test_bad_method_settings_and_pareto_samples(session: Session):
    with pytest.raises(WorkbenchError, match="bad merge method settings"):
        session.start_search(_form("ties", "radius=2", "bad"))
    with pytest.raises(Exception, match="sample tokens"):
        session.start_search(SearchSpec(sample_prompts="p", sample_tokens=0, study_name="bad2"))
    run = ParetoRun(session.shared, SearchSpec(objectives=("loss:ja", "loss:en"), trials=2, sampler="random",
                                               search_limit=2, sample_prompts="the quick", sample_tokens=3),
                    session.workspace.storage_url, session.workspace.workdir).start()
    assert run.wait(120) and run.error is None, run.error
    trials = load_study(session.workspace.storage_url, run.study_name).trials
    assert all(record.trial_samples(t)[0]["prompt"] == "the quick" for t in trials)


def test_sample_text_is_shown_as_written_in_the_hover_and_the_panel():
    """Quotes, backticks and angle brackets in a model's text: the hover label (plotly decodes &lt; &gt; &amp; but
    not &quot;) and the clicked-trial panel (a backtick ended its Markdown code span) show the text as it is."""
    from workbench.tabs.search import _preview

    samples = [{"prompt": 'say "hi"', "text": 'a `b` "c" <d> & e'}]
    hover = _preview(samples)
    assert "&quot;" not in hover and '"c" &lt;d&gt; &amp; e' in hover and hover.startswith('<i>say "hi"</i>')
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"ja": 0.5}, value=1.0,
                                              distributions={"ja": optuna.distributions.FloatDistribution(0, 1)},
                                              user_attrs={record.SAMPLES: samples}))
    md = samples_md(study, 0)
    assert md.endswith("<i>say &quot;hi&quot;</i> → <code>a `b` &quot;c&quot; &lt;d&gt; &amp; e</code>"), md
