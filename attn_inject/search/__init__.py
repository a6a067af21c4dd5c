"""``attn-inject search``: an ablation or a search over attention placements on the user's
data, each candidate fine-tuned over several seeds next to a baseline with no block, on
Optuna (``pip install 'attn-inject[search]'``).

- :mod:`.candidates`: what is compared (recipes, the baseline);
- :mod:`.space`: a search space file, each point a recipe;
- :mod:`.trial`: one trial, a convert and a real fine-tune;
- :mod:`.study`: the Optuna study, its storage and the worker loop;
- :mod:`.study_files`: where a study's trials and report go in ``--out``;
- :mod:`.records`: the study's trials as the report reads them, every value checked;
- :mod:`.leaderboard`: the report, with intervals over seeds;
- :mod:`.run`: the search from its checks to its report.
"""

from __future__ import annotations

from .candidates import BASELINE, Candidate, from_recipes
from .errors import SearchError
from .leaderboard import Row
from .run import SearchConfig, SearchResult, search
from .space import load_space
from .trial import Base

__all__ = [
    "BASELINE",
    "Base",
    "Candidate",
    "Row",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "from_recipes",
    "load_space",
    "search",
]
