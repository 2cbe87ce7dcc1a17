{{- define "fluxserve.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fluxserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fluxserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fluxserve.secretName" -}}
{{- .Values.existingSecret | default (include "fluxserve.fullname" .) -}}
{{- end -}}

{{/* The settings every fluxserve pod shares: database, storage, keys (from the Secret), models. */}}
{{- define "fluxserve.env" -}}
- {name: FLUXSERVE_DATA_DIR, value: /data}
- {name: FLUXSERVE_PUBLIC_URL, value: {{ required "publicUrl is required: where clients reach the API (the base of the URLs it hands out)" .Values.publicUrl | quote }}}
- {name: FLUXSERVE_STORAGE, value: {{ .Values.storage.url | quote }}}
{{- with .Values.storage.endpointUrl }}
- {name: FLUXSERVE_S3_ENDPOINT_URL, value: {{ . | quote }}}
{{- end }}
{{- with .Values.storage.publicUrl }}
- {name: FLUXSERVE_S3_PUBLIC_URL, value: {{ . | quote }}}
{{- end }}
- {name: AWS_REGION, value: {{ .Values.storage.region | quote }}}
{{- if .Values.models }}
- {name: FLUXSERVE_MODEL_CONFIG, value: /etc/fluxserve/models.toml}
{{- end }}
{{- range $k, $v := .Values.env }}
- {name: {{ $k }}, value: {{ $v | quote }}}
{{- end }}
{{- end -}}

{{- define "fluxserve.envFrom" -}}
- secretRef: {name: {{ include "fluxserve.secretName" . }}}
{{- end -}}

{{- define "fluxserve.modelsVolume" -}}
{{- if .Values.models -}}
- name: models
  configMap: {name: {{ include "fluxserve.fullname" . }}-models}
{{- end }}
{{- end -}}

{{- define "fluxserve.modelsMount" -}}
{{- if .Values.models -}}
- {name: models, mountPath: /etc/fluxserve, readOnly: true}
{{- end }}
{{- end -}}

{{- define "fluxserve.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
{{- end -}}
