-- A new API key NOTIFYs too: the API keeps "no key exists yet" until the next NOTIFY (the check is a round trip
-- per request otherwise), and the first key must end open access in every server process at once.
CREATE FUNCTION mflux_key_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mflux', 'key');
    RETURN NULL;
END $$;
CREATE TRIGGER api_keys_added AFTER INSERT ON api_keys FOR EACH ROW EXECUTE FUNCTION mflux_key_added();
