"""Integrations with frameworks: ``chaussette.contrib.django``."""
