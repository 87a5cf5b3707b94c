# shellcheck shell=bash
# small_upstream_conf DIR ADDR: an nginx config (on stdout) that answers every request with the
# small JSON document of the benchmarks, from one worker, its files in DIR.
small_upstream_conf() {
  cat <<EOF
daemon off;
worker_processes 1;
pid $1/nginx.pid;
error_log $1/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $1/tmp;
    keepalive_requests 1000000;
    server {
        listen $2;
        location / {
            default_type application/json;
            return 200 '{"id":42,"name":"bench","status":"ok","tags":["a","b","c"],"price":12.5,"ts":"2024-01-01T00:00:00Z"}';
        }
    }
}
EOF
}
