"""Running trials: one attack (`attack`), one defense (`defense`), and the folders they are written
to and read from (`folder`). Everything is importable from here:

    from trials.run import AttackSpec, run_attack, save_attack_result, load_attacked, DefenseSpec, run_defense
"""

from trials.run.attack import AttackResult, AttackSpec, resolve_recipe, run_attack, validate
from trials.run.defense import (
    DefenseResult,
    DefenseSpec,
    defense_data,
    resolve_defense,
    run_defense,
    training_amp,
)
from trials.run.folder import (
    ATTACKED_FILES,
    POISONED_FILE,
    AttackedModel,
    evaluate_attacked,
    load_attacked,
    save_attack_result,
    save_defense_result,
)

__all__ = [
    "ATTACKED_FILES",
    "POISONED_FILE",
    "AttackResult",
    "AttackSpec",
    "AttackedModel",
    "DefenseResult",
    "DefenseSpec",
    "defense_data",
    "evaluate_attacked",
    "load_attacked",
    "resolve_defense",
    "resolve_recipe",
    "run_attack",
    "run_defense",
    "save_attack_result",
    "save_defense_result",
    "training_amp",
    "validate",
]
