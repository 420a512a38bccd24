"""Mixed-precision search: CQAP predictor + genetic search under a cost budget."""

from deployq.search.api import SearchConfig, SearchResult, search
from deployq.search.cost import Budget, parse_budget

__all__ = ["Budget", "SearchConfig", "SearchResult", "parse_budget", "search"]
