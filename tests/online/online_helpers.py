def merge_kinds(plan):
    return [s["op"] for s in plan["steps"] if s["op"] in ("commit", "pull")]
