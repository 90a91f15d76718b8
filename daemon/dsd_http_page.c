/* dsd_http_page.c — the status page served at / (placeholder until the page lands). */
const char dsd_http_status_page[] = "<!doctype html><title>dsd</title><p>dsd status</p>\n";
