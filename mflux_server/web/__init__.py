"""The web UI's files (index.html, app.js, style.css), served by the API at / and /ui/."""
