"""Quality profiles (judge scores per request and model) and their replay under thresholds."""

from cascadia.quality.loaders import (
    BUILTIN_PROFILES,
    QUALITY_FORMATS,
    WIDE_METADATA_COLUMNS,
    WIDE_METADATA_SUFFIXES,
    builtin_profile_path,
    load_mtbench_prompts,
    load_quality,
    save_quality_long,
    sniff_quality_format,
)
from cascadia.quality.profile import QualityFormatError, QualityProfile
from cascadia.quality.cascade_replay import (
    ReplayResult,
    candidate_thresholds,
    match_requests,
    replay,
    stop_stages,
)

__all__ = [
    "BUILTIN_PROFILES",
    "QUALITY_FORMATS",
    "WIDE_METADATA_COLUMNS",
    "WIDE_METADATA_SUFFIXES",
    "QualityFormatError",
    "QualityProfile",
    "ReplayResult",
    "builtin_profile_path",
    "candidate_thresholds",
    "load_mtbench_prompts",
    "load_quality",
    "match_requests",
    "replay",
    "save_quality_long",
    "sniff_quality_format",
    "stop_stages",
]
