package httpapi

import (
	"net/http/httptest"
	"testing"
)

// The bytes of Python's json.dumps (aiohttp's json_response), computed
// with CPython 3: separators ", " and ": ", ensure_ascii.
func TestPythonJSON(t *testing.T) {
	for _, c := range []struct {
		in   any
		want string
	}{
		{map[string]string{"error": "é <a>&😀 \"q\", x: y\\z\n\t"}, `{"error": "\u00e9 <a>&\ud83d\ude00 \"q\", x: y\\z\n\t"}`},
		{map[string]any{"a": []any{1, 2.5, nil, true}, "b": map[string]string{"c": ""}}, `{"a": [1, 2.5, null, true], "b": {"c": ""}}`},
		{map[string]any{}, `{}`},
	} {
		got, err := pythonJSON(c.in)
		if err != nil || string(got) != c.want {
			t.Errorf("pythonJSON = %s, %v; want %s", got, err, c.want)
		}
	}
	rec := httptest.NewRecorder()
	writeJSON(rec, 404, map[string]string{"error": "404: Not Found"})
	if rec.Code != 404 || rec.Body.String() != `{"error": "404: Not Found"}` ||
		rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("writeJSON: %d %q %q", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
}
