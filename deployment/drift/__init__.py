"""Fleet drift on the cloud side: baseline packs, merged window profiles, the HTML report."""
