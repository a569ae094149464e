"""Image-path settings that are not config fields. The ``image:`` and ``deepspeed:`` sections are validated with
the rest of the config (``braid_ray.config.validate_image_sections``), against registry names declared there."""

from __future__ import annotations

DEFAULT_QUANTILE = 0.5  # D_off = offline images below the median oracle score, unless data.quantile says otherwise
