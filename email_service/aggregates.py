"""Percentiles of delivery time in SQL, on PostgreSQL natively and on SQLite through a Python aggregate."""

import math

from django.db.models import Aggregate, F, FloatField

SQLITE_PERCENTILE = "medcor_percentile"


class SecondsBetweenPercentile(Aggregate):
    """The `fraction` percentile (0..1, interpolated) of seconds from `start` to `end`."""

    output_field = FloatField()

    def __init__(self, end, start, fraction, **extra):
        super().__init__(F(end), F(start), **extra)
        self.fraction = float(fraction)

    def _as_vendor_sql(self, compiler, connection, function, template, arg_joiner, **extra_context):
        clone = self.copy()
        clone.function, clone.template, clone.arg_joiner = function, template, arg_joiner
        return super(SecondsBetweenPercentile, clone).as_sql(compiler, connection, **extra_context)

    def as_postgresql(self, compiler, connection, **extra_context):
        return self._as_vendor_sql(
            compiler,
            connection,
            "percentile_cont",
            f"%(function)s({self.fraction}) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM (%(expressions)s)))",
            " - ",
            **extra_context,
        )

    def as_sqlite(self, compiler, connection, **extra_context):
        return self._as_vendor_sql(
            compiler,
            connection,
            SQLITE_PERCENTILE,
            f"%(function)s((julianday(%(expressions)s)) * 86400.0, {self.fraction})",
            ") - julianday(",
            **extra_context,
        )


class _Percentile:
    """SQLite aggregate matching PostgreSQL's percentile_cont: linear interpolation between rows."""

    def __init__(self):
        self.values = []
        self.fraction = 0.5

    def step(self, value, fraction):
        if value is not None:
            self.values.append(value)
            self.fraction = fraction

    def finalize(self):
        if not self.values:
            return None
        values = sorted(self.values)
        position = self.fraction * (len(values) - 1)
        low, high = math.floor(position), math.ceil(position)
        return values[low] + (values[high] - values[low]) * (position - low)


def register_sqlite_functions(sender, connection, **kwargs):
    """Add the percentile aggregate to each new SQLite connection."""
    if connection.vendor == "sqlite":
        connection.connection.create_aggregate(SQLITE_PERCENTILE, 2, _Percentile)
