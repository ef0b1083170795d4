"""Luigi targets of Digifeeds: the status markers in S3."""

from targets.markers import Failure, Marker, MarkerStore, MarkerTarget

__all__ = ["Failure", "Marker", "MarkerStore", "MarkerTarget"]
