"""The export wing: what leaves a trial: a ticket's folder and compact models."""
