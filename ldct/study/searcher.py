"""Ray's OptunaSearch, telling Optuna that an ASHA-stopped trial was pruned, not completed.

Ray 2.60's ``OptunaSearch.on_trial_complete`` (ray/tune/search/optuna/optuna_search.py, lines
543-573) tells Optuna ``TrialState.COMPLETE`` with the trial's last value whenever that value
exists, and ``PRUNED`` only when there is none. A trial ASHA stopped at its first rung therefore
entered TPE's model and the report's fANOVA as a finished trial with a cut-short score. And Tune
does not show the searcher the result on which its scheduler decided to stop
(ray/tune/execution/tune_controller.py ``_process_trial_result``, lines 1584-1590: "Only updating
search alg if the trial is not to be stopped"), so that validation never reached Optuna as an
intermediate value either; nor did a finished trial's last one (ASHA also says STOP at max_t,
ray/tune/schedulers/async_hyperband.py line 154).

:class:`PruningOptunaSearch` keeps everything else of OptunaSearch (ask/tell, the persistent
study, enqueued points, save/restore) and changes the end of a trial: its last validation is
reported as an intermediate value, and one that ended without an error before
``train.iterations`` (the rule of ``ldct.tracking.runs.trial_status``, which also sets the MLflow
tag) is told as ``PRUNED``; an errored one is ``FAIL`` whatever its last result. Optuna then records that intermediate value as the trial's value; TPE ranks pruned
trials by how far they got (below every complete one), and fANOVA, which reads complete trials
only, leaves them out. Multi-objective studies (Pareto: no ASHA, and Optuna has no intermediate
values for them) keep Ray's behaviour.
"""

from __future__ import annotations

import logging
from typing import Any

from ldct.tracking.runs import trial_status

logger = logging.getLogger("ldct")
TRAINING_ITERATION = "training_iteration"  # Tune's count of a trial's results: the Optuna step


def _optuna_search_base() -> type:
    # Module-level subclass (Tune pickles the searcher with the experiment and restores it by
    # class path), so Ray Tune and Optuna load with this module: only ldct.study.run imports it.
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class PruningOptunaSearch(_optuna_search_base()):  # type: ignore[misc]
    """OptunaSearch whose ASHA-stopped trials are ``PRUNED`` with their intermediate values.

    ``iterations``: the trials' ``train.iterations``; a trial whose last result's ``step`` is
    below it, and which did not fail, was stopped. Every other argument is OptunaSearch's.
    """

    def __init__(self, *args: Any, iterations: int, **kwargs: Any) -> None:
        self.iterations = int(iterations)
        self._reported: dict[str, int] = {}  # trial id -> last step told to Optuna
        super().__init__(*args, **kwargs)

    def _single_objective(self) -> bool:
        return not isinstance(self.metric, list)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Ray indexes result[metric]: a report without the validation metric would raise.
        if not self._single_objective() or self.metric in result:
            super().on_trial_result(trial_id, result)
            if self._single_objective() and trial_id not in self._completed_trials:
                self._reported[trial_id] = int(result[TRAINING_ITERATION])

    def _report_last(self, trial_id: str, result: dict) -> None:
        """The trial's last validation as an intermediate value: Tune keeps the result its
        scheduler stops on (ASHA's rung, and max_t for a finished trial) from on_trial_result."""
        value, step = result.get(self.metric), result.get(TRAINING_ITERATION)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or value is None or step is None:
            return
        if int(step) > self._reported.get(trial_id, -1):
            ot_trial.report(float(value), int(step))
            self._reported[trial_id] = int(step)

    def was_stopped(self, result: dict | None, error: bool = False) -> bool:
        """Whether a trial that ended with ``result`` (its last) was stopped early, not finished."""
        if error or not result:
            return False
        return trial_status(False, result.get("step"), self.iterations) == "stopped"

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error:
            # FAIL, whatever the last result: Ray tells COMPLETE when an errored trial's result
            # carries the metric (Tune itself passes none on error).
            super().on_trial_complete(trial_id, result=None, error=True)
            return
        if not self._single_objective() or trial_id in self._completed_trials or not result:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        self._report_last(trial_id, result)
        if not self.was_stopped(result) or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        import optuna

        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 - Ray's own tell does the same: the study goes on
            logger.warning("telling Optuna trial %s pruned failed: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
