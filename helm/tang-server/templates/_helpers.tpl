{{- define "tang.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tang.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tang.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tang.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tang.labels" -}}
{{ include "tang.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tang.secretName" -}}
{{- if .Values.keys.existingSecret -}}
{{- .Values.keys.existingSecret -}}
{{- else -}}
{{- printf "%s-keys" (include "tang.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tang.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tang.headless" -}}
{{- printf "%s-headless" (include "tang.fullname" .) -}}
{{- end -}}

{{- define "tang.serviceUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "tang.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{/*
The --workers value: the one given; else none when the container has a CPU limit (the server reads its cgroup's
CPU quota, which Kubernetes sets from the limit); else the CPU request rounded up, at least 1 (without a limit the
cgroup has no quota and the server would count every CPU of the node).
*/}}
{{- define "tang.workers" -}}
{{- $resources := .Values.resources | default dict -}}
{{- $limits := $resources.limits | default dict -}}
{{- $requests := $resources.requests | default dict -}}
{{- if .Values.workers -}}
{{- .Values.workers -}}
{{- else if not $limits.cpu -}}
{{- include "tang.wholeCpus" ($requests.cpu | default 1) -}}
{{- end -}}
{{- end -}}

{{/* A CPU quantity ("500m", "1.5", 2) in whole CPUs, rounded up, at least 1. */}}
{{- define "tang.wholeCpus" -}}
{{- $quantity := toString . -}}
{{- if hasSuffix "m" $quantity -}}
{{- max 1 (div (add (trimSuffix "m" $quantity | atoi) 999) 1000) -}}
{{- else -}}
{{- max 1 (ceil (float64 $quantity) | int) -}}
{{- end -}}
{{- end -}}
