"""The log's own names for the keys the pipeline reads (`PipelineConfig.keys`).

The components read a row's request key, click label and request time as `request_id`, `click`
and `request_time` (`schema.features`). A log that names them otherwise, or keys requests by a
string, sets `keys` in its config; the KeyMapper component (`components.key_mapper`) then adds the
three features to every row, computed from the log's columns. With the defaults nothing is added
and the component is not in the pipeline.
"""
import dataclasses

from cascade_ranking.schema import features as F

# What `cascade init` takes for each key when the data has no column of the pipeline's own name.
KEY_NAME_HINTS = {
    "request_id": ("request_id", "session_id", "session", "impression_id", "request", "req_id", "query_id",
                   "page_view_id", "search_id"),
    "click": ("click", "clicked", "is_click", "clicks", "label", "is_clicked"),
    "request_time": ("request_time", "timestamp", "time", "ts", "event_time", "event_timestamp"),
}


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    request_id: str = F.REQUEST_ID_KEY  # the request key column: int64, or a string (hashed to int64)
    click: str = F.LABEL_KEY  # the label column: > 0 is a click
    request_time: str = F.REQUEST_TIME_KEY  # the request's time column (int64); "" = none (time 0)

    def __post_init__(self):
        if not self.request_id or not self.click:
            raise ValueError("keys.request_id and keys.click name the log's request key and label columns")

    @property
    def mapped(self) -> bool:
        """Whether the log names its keys otherwise (the KeyMapper then runs)."""
        return self != KeyConfig()

    def data_columns(self):
        """The log's key columns (every row must carry request key and label)."""
        return tuple(name for name in (self.request_id, self.click) if name)
