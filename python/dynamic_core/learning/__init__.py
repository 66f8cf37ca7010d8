"""Learning: online-trained micro-agents and the DynamicLoRA hierarchy they adapt through
(:mod:`dynamic_core.learning.lora`)."""

from __future__ import annotations
