"""Schedule rules (dlight-style, grouped by target) and MetaSchedule database application."""
