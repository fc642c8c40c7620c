-- The dashboard's latest units (RecentUnits).
CREATE INDEX units_updated ON units (updated);
